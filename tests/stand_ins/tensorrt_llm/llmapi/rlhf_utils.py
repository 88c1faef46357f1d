"""Stand-in of tensorrt_llm/llmapi/rlhf_utils.py (1.2 line, @04762f3b): only the finalisation,
`update_weights(None)`, which ends a refit and removes the pre-reload latch."""


class WorkerExtension:
    def update_weights(self, ipc_handles=None) -> None:
        if ipc_handles is not None:
            raise NotImplementedError("the stand-in takes no CUDA IPC handles")
        model = self.engine.model_engine.model
        if not hasattr(model, "first_pre_reload_weights"):
            raise RuntimeError("update_weights(None) without a refit in progress")
        del model.first_pre_reload_weights
        self.engine.reset_prefix_cache()
