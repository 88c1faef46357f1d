"""A stand-in for TensorRT-LLM 1.2, which cannot be installed here: the names our adapters use
(generation/trtllm.py, trtllm_worker.py, trtllm_refit_ext.py), behaving as the 1.2-line source
read there says, with a transformers Llama as each Ray GPU worker's model. Only a test puts this
folder on PYTHONPATH (tests/trtllm_worker_check.py, in the Ray actors it starts).

What it keeps of TensorRT-LLM (the files these modules cite): AsyncLLM is awaited to set up, puts
one Ray worker per placement bundle, builds the worker class from RayGPUWorker and the class named
in `ray_worker_extension_cls` (refusing a clash of names), and runs `collective_rpc` on every worker;
each worker has called init_process_group for its engine's own group, and holds `engine`
(model_engine.model / model_loader.reload / control_action) and `device_id`. Generation is greedy
only (top_k=1), one request at a time, and refuses to run on weights whose refit was not finalised.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import types

import torch

__version__ = "1.2.0"


class SamplingParams:
    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)


class _Loader:
    def reload(self, model, weights: dict, allow_partial_loading: bool = False) -> None:
        if not allow_partial_loading:
            raise ValueError("the stand-in reloads partial weights only")
        unknown = set(weights) - set(model.state_dict())
        if unknown:
            raise KeyError(f"weights the model does not have: {sorted(unknown)}")
        model.load_state_dict(weights, strict=False)


class RayGPUWorker:
    """One engine worker: rank `rank` of its engine's `world` workers."""

    def __init__(self, rank: int, world: int, port: int, model_dir: str) -> None:
        import json

        import ray
        import torch.distributed as dist
        from transformers import LlamaConfig, LlamaForCausalLM

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        self.device_id = int(ray.get_gpu_ids()[0])
        with open(os.path.join(model_dir, "config.json")) as f:
            model = LlamaForCausalLM(LlamaConfig(**json.load(f))).eval()
        model.requires_grad_(False)
        self.engine = types.SimpleNamespace(
            model_engine=types.SimpleNamespace(model=model, model_loader=_Loader()),
            control_action=contextlib.nullcontext, reset_prefix_cache=lambda: None)

    def standin_call(self, method: str, args: tuple, kwargs: dict):
        return getattr(self, method)(*args, **kwargs)

    @torch.no_grad()
    def standin_generate(self, prompt: list[int], params: SamplingParams):
        model = self.engine.model_engine.model
        if hasattr(model, "first_pre_reload_weights"):
            raise RuntimeError("generate on weights whose refit was not finalised (update_weights(None))")
        if params.top_k != 1 or params.n != 1:
            raise NotImplementedError("the stand-in generates greedily, one sample per request")
        tokens, logprobs, reason = [], [], "length"
        for _ in range(params.max_tokens):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float() / params.temperature
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
            if token in getattr(params, "stop_token_ids", []):
                reason = "stop"
                break
        return types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens, logprobs=logprobs,
                                                                    finish_reason=reason)])


def _worker_class(qualname: str) -> type:
    module, _, name = qualname.rpartition(".")
    extension = getattr(importlib.import_module(module), name)
    clash = {n for n in dir(extension) if not n.startswith("__") and hasattr(RayGPUWorker, n)}
    if clash:
        raise ValueError(f"the worker extension {qualname} redefines {sorted(clash)}")
    return type(f"RayGPUWorkerWith{extension.__name__}", (RayGPUWorker, extension), {})


class AsyncLLM:
    def __init__(self, placement_groups, placement_bundle_indices, per_worker_gpu_share, **kwargs) -> None:
        self.groups, self.bundles, self.share, self.kwargs = (placement_groups, placement_bundle_indices,
                                                             per_worker_gpu_share, kwargs)

    def __await__(self):
        return self._setup().__await__()

    async def _setup(self) -> "AsyncLLM":
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from nemo_rlsr.distributed.parallel import free_port

        cls = ray.remote(_worker_class(self.kwargs["ray_worker_extension_cls"]))
        slots = [(group, bundle) for group, bundles in zip(self.groups, self.bundles) for bundle in bundles]
        port = free_port()
        self.workers = [cls.options(num_cpus=0, num_gpus=self.share, scheduling_strategy=
                                    PlacementGroupSchedulingStrategy(group, bundle)).remote(
            rank, len(slots), port, self.kwargs["model"]) for rank, (group, bundle) in enumerate(slots)]
        await asyncio.gather(*[w.standin_call.remote("__sizeof__", (), {}) for w in self.workers])  # all up
        return self

    async def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                             unique_reply_rank: int | None = None) -> list:
        return list(await asyncio.gather(*[w.standin_call.remote(method, args, kwargs or {}) for w in self.workers]))

    async def update_weights(self, weights) -> None:
        await self.collective_rpc("update_weights", args=(weights,))

    async def generate_async(self, prompt: list[int], sampling_params: SamplingParams):
        return await self.workers[0].standin_generate.remote(prompt, sampling_params)

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
