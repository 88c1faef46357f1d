"""The receiving side of a broadcast refit (weight_sync/broadcast.py) inside TensorRT-LLM's Ray GPU
workers: how an engine on GPUs of its own takes the trainer's weights. Written against TensorRT-LLM
1.2 and never run (no GPU, no TensorRT-LLM here).

Read in NVIDIA/TensorRT-LLM (the 1.2 line's stored versions; the v1.2.0 tag itself could not be
fetched, see generation/trtllm.py):
* tensorrt_llm/llmapi/rlhf_utils.py @04762f3b: `WorkerExtension.update_weights(ipc_handles)` takes
  CUDA IPC handles only. Before the first bucket of a refit it calls `pre_reload_weights()` on every
  module that has it (and is not `_weights_removed`) and sets the latch `first_pre_reload_weights`
  on the model. Each bucket goes to `engine.model_engine.model_loader.reload(model, weights,
  allow_partial_loading=True)`. `update_weights(None)` finalises (post-load hooks, the MoE load
  balancer, prefix-cache reset) and removes the latch.
* tensorrt_llm/executor/ray_gpu_worker.py @0acd798d: the worker class is built as
  `type(..., (RayGPUWorker, extension))` from `ray_worker_extension_cls` (a qualified name); a
  method name that clashes with the worker's raises, hence the `nemo_rlsr_` prefix. The worker
  holds `self.engine` (PyExecutor) and `self.device_id`, and has called
  `torch.distributed.init_process_group` itself: the refit group is a group of its own.
* tensorrt_llm/_ray_utils.py: `control_action_decorator` runs the method inside
  `engine.control_action()`, which pauses the executor loop. The 1.2 line has only the bare form
  (no `drain=`).

The protocol: the leader calls `nemo_rlsr_join` on every worker once (collective_rpc), then per
refit `nemo_rlsr_receive(version)` on every worker and, once those return, TensorRT-LLM's own
`update_weights(None)` to finalise: the pre-reload step here sets the same latch, so the stock
finalisation applies unchanged.

`RefitExtension` (the class named in `ray_worker_extension_cls`) is built on first access from
`BroadcastReceiver` and TensorRT-LLM's `WorkerExtension`, so this module imports without
TensorRT-LLM and `BroadcastReceiver` runs in tests against a recording engine.
"""

from __future__ import annotations

import torch

from nemo_rlsr.weight_sync.broadcast import LAYOUT, RefitGroup, receive_refit

EXTENSION_QUALNAME = f"{__name__}.RefitExtension"
PRE_RELOAD_LATCH = "first_pre_reload_weights"  # rlhf_utils.py's attribute name: its finalise removes it


class BroadcastReceiver:
    """Methods mixed into each TensorRT-LLM Ray GPU worker (`self.engine`, `self.device_id` are the
    worker's)."""

    def nemo_rlsr_join(self, host: str, port: int, rank_offset: int, world: int, timeout_s: float,
                       backend: str = "nccl") -> int:
        """Join the refit group as rank `rank_offset` + this worker's rank in its engine; read the
        manifest and plan the trainer published. Returns the group rank. `backend`: nccl (buckets
        arrive in the worker's GPU memory); gloo (CPU buffers: a test without GPUs)."""
        import torch.distributed as dist

        rank = rank_offset + dist.get_rank()
        self._nemo_rlsr_device = torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(self.device_id)
            self._nemo_rlsr_device = torch.device("cuda", self.device_id)
        self._nemo_rlsr_group = RefitGroup.create(host, port, rank, world, backend, timeout_s)
        self._nemo_rlsr_layout = self._nemo_rlsr_group.fetch(LAYOUT)
        return rank

    def nemo_rlsr_receive(self, version: int) -> int:
        """Receive refit `version` bucket by bucket into the engine's model (partial loads); the
        caller finalises with `update_weights(None)`. Returns the number of tensors loaded."""
        model = self.engine.model_engine.model
        loader = self.engine.model_engine.model_loader
        if not hasattr(model, PRE_RELOAD_LATCH):  # what update_weights does before a refit's first bucket
            for module in model.modules():
                if hasattr(module, "pre_reload_weights") and not getattr(module, "_weights_removed", False):
                    module.pre_reload_weights()
            setattr(model, PRE_RELOAD_LATCH, True)
        group = self._nemo_rlsr_group
        manifest, plan = self._nemo_rlsr_layout
        loaded = 0

        def load(items: list[tuple[str, torch.Tensor]]) -> None:
            nonlocal loaded
            loader.reload(model, dict(items), allow_partial_loading=True)
            loaded += len(items)

        group.signal_ready(version)
        receive_refit(group, manifest, plan, load, self._nemo_rlsr_device)
        return loaded


def _build_extension() -> type:
    from tensorrt_llm._ray_utils import control_action_decorator
    from tensorrt_llm.llmapi.rlhf_utils import WorkerExtension

    # join inside a control action too: NCCL's communicator setup must not interleave with the
    # engine's own collectives (NeMo-RL's TensorRT-LLM backend, nemo_rl/models/generation/trtllm/
    # trtllm_backend.py @05068bf1, wraps its init_collective the same way)
    methods = {name: control_action_decorator(getattr(BroadcastReceiver, name))
               for name in ("nemo_rlsr_join", "nemo_rlsr_receive")}
    return type("RefitExtension", (BroadcastReceiver, WorkerExtension), {"__module__": __name__, **methods})


def __getattr__(name: str):
    if name == "RefitExtension":
        cls = _build_extension()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
