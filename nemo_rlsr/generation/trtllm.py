"""TensorRT-LLM rollout engine (PyTorch backend), written against TensorRT-LLM 1.2.0 and never run here.

Pinned: 1.2.0, the version of our base image nvcr.io/nvidia/tensorrt-llm/release:1.2.0 (not installable
on our CPU machines, so every name below was checked by reading NVIDIA/TensorRT-LLM's source, not by
running it). The v1.2.0 tag itself could not be checked out here (the repository snapshot is too large to
fetch); the files read are the stored versions of the 1.2 line and the commit that introduced the RL
placement API, 89dabf5aa1 "[TRTLLM-9736][feat] AsyncLLM and verl integ (#9353)", 2025-12-11, before the
1.2.0rc6 / 1.2.0 release branch. `_build_llm` checks the installed AsyncLLM's signature, so a 1.2.0 without
that API fails with a clear error instead of silently placing workers elsewhere.

* tensorrt_llm/_torch/async_llm.py: `AsyncLLM(placement_groups, placement_bundle_indices,
  per_worker_gpu_share, **llm_args)` wraps them in `RayPlacementConfig(defer_workers_init=True, ...)`,
  forces orchestrator_type="ray" and allreduce_strategy="NCCL", defaults ray_worker_extension_cls to
  rlhf_utils.WorkerExtension; `await llm` runs `setup_async` (workers + engines). `release(tags)` /
  `resume(tags)` call the workers' sleep / wakeup; `update_weights(dict | None)`.
* tensorrt_llm/llmapi/llm_args.py: `RayPlacementConfig` (above), `enable_sleep`, `load_format`
  ("dummy", upper-cased into LoadFormat), `KvCacheConfig(enable_block_reuse, free_gpu_memory_fraction)`.
* tensorrt_llm/executor/ray_executor.py: with `placement_groups` set, worker i is created with
  num_gpus=per_worker_gpu_share in bundle `placement_bundle_indices` (flattened) of its group; the
  placement groups passed in are not removed at shutdown.
* tensorrt_llm/executor/ray_gpu_worker.py: a worker uses `ray.get_gpu_ids()[0]` as its GPU.
* tensorrt_llm/llmapi/rlhf_utils.py: `WorkerExtension.update_weights({device_uuid:
  base64(pickle([(hf_name, (rebuild_fn, args)), ...]))})` keeps only its own device's entry, rebuilds each
  tensor with args[6] = its device and reloads it (partial loading); `update_weights(None)` finalises
  (post-load hooks, prefix-cache reset).
* tensorrt_llm/_torch/virtual_memory.py: the ExecutorMemoryType tags of WEIGHT_TAGS / KV_CACHE_TAGS.
* `llm.generate_async(prompt_ids, SamplingParams(max_tokens, temperature, top_p, top_k, n, seed,
  logprobs=1, end_id, pad_id, ignore_eos, detokenize=False))` (tensorrt_llm/sampling_params.py); each
  output's `token_ids` and `logprobs` (one {token: Logprob} dict per token), as verl's TensorRT-LLM
  rollout (verl/workers/rollout/trtllm_rollout/trtllm_async_server.py) reads them.

Placement (trtllm_placement.py): one engine per model-parallel group (TP x PP trainer ranks), with
tensor_parallel_size = TP x PP; its Ray workers sit on exactly the GPUs of that group's ranks, because a
worker only opens the IPC handles of its own device. Rank 0 reserves every GPU of the trainer nodes as
one-GPU bundles, reads which GPU each bundle holds and hands each group's leader its bundles. Every
rank of a group sends every full HF tensor (PP->TP: the engine's loader shards them), turned into IPC
handles of tensors on its own GPU; the leader gathers them and makes the call.

Only the pure parts (options, placement plan, sampling arguments, handle serialisation, output
conversion) run without TensorRT-LLM; tests/test_rollout_engines.py and tests/test_trtllm_placement.py
check them (the placement's Ray calls against a local Ray with logical GPUs). Not verified anywhere:
FP8 (`quant_config` with weights refitted in BF16 and quantised by the engine's loader).
"""

from __future__ import annotations

import asyncio
import base64
import pickle
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.layout import rollout_batch
from nemo_rlsr.generation.sampling import request_seeds
from nemo_rlsr.generation.trtllm_placement import EnginePlacement, connect_ray, device_key, reserve_and_plan
from nemo_rlsr.weight_sync.buckets import Bucket, refit

PINNED_VERSION = "1.2"
# ExecutorMemoryType tags of TensorRT-LLM 1.2: everything but the KV cache holds weights or buffers
# that must be back before a refit writes into them.
WEIGHT_TAGS = ("sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra",
               "executor_extra", "model", "draft_model")
KV_CACHE_TAGS = ("kv_cache",)


@dataclass(frozen=True)
class TRTLLMOptions:
    model_dir: str  # an HF directory with config.json (weights come from the first refit)
    tensor_parallel: int
    max_batch_size: int
    max_seq_len: int
    fp8: bool = False
    kv_cache_fraction: float = 0.5  # of the GPU memory left free once the weights are loaded

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1 or self.max_batch_size < 1 or self.max_seq_len < 2:
            raise ValueError(f"bad TensorRT-LLM options: {self}")
        if not 0 < self.kv_cache_fraction < 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1), got {self.kv_cache_fraction}")


def llm_kwargs(opts: TRTLLMOptions) -> dict:
    """Keyword arguments of `AsyncLLM`, with TensorRT-LLM config objects as plain specs
    ("kv_cache_config", "quant_config") that `_build_llm` instantiates."""
    kwargs = {
        "model": opts.model_dir, "backend": "pytorch", "orchestrator_type": "ray",
        "ray_worker_extension_cls": "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension",
        "tensor_parallel_size": opts.tensor_parallel, "max_batch_size": opts.max_batch_size,
        "max_seq_len": opts.max_seq_len, "enable_sleep": True, "load_format": "dummy",
        "skip_tokenizer_init": True,
        # prefix reuse is what shares a prompt's KV cache among its n samples
        "kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": opts.kv_cache_fraction},
    }
    if opts.fp8:
        # weights quantised to FP8 (per-tensor scales) when loaded; the trainer keeps its precision
        kwargs["quant_config"] = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    return kwargs


# The trainer is outside Ray, so an engine worker is the only Ray user of its bundle's GPU.
WORKER_GPU_SHARE = 1.0


def placement_kwargs(placement: EnginePlacement, node_groups: dict) -> dict:
    """`AsyncLLM` placement arguments of one engine: its nodes' placement groups (`node_groups[node]`)
    and, per group, the bundle indices of its workers."""
    return {"placement_groups": [node_groups[node] for node in placement.nodes],
            "placement_bundle_indices": [list(b) for b in placement.bundle_indices],
            "per_worker_gpu_share": WORKER_GPU_SHARE}


def sampling_kwargs(params: SamplingParams, seed: int, eos_id: int, pad_id: int) -> dict:
    """`tensorrt_llm.SamplingParams` arguments of one request (its n samples share the prompt)."""
    kwargs = {
        "max_tokens": params.max_new_tokens, "n": params.n, "seed": seed, "logprobs": 1,
        "pad_id": pad_id, "detokenize": False,
        "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
        # ids only: stop strings need the engine's tokenizer, and ours is not an HF one
        "end_id": eos_id, "ignore_eos": not params.stop_on_eos,
    }
    if params.greedy:
        kwargs |= {"top_k": 1, "top_p": 1.0}
    if params.stop:
        raise ValueError("rollout.stop strings are not supported by the trtllm engine (word-level tokenizer); "
                         "use stop_on_eos")
    return kwargs


def serialize_handles(bucket: Bucket, device_uuid: str) -> dict[str, str]:
    """{device_uuid: base64(pickle([(hf_name, (rebuild_fn, args)), ...]))}: one bucket as the
    WorkerExtension's `update_weights` reads it. The tensors must stay alive until the call returns."""
    from torch.multiprocessing.reductions import reduce_tensor

    handles = [(name, reduce_tensor(tensor.detach().contiguous())) for name, tensor in bucket]
    return {device_uuid: base64.b64encode(pickle.dumps(handles)).decode("ascii")}


Completion = tuple[list[int], list[float], bool]  # token ids, their logprobs, ended on EOS/stop


def completions(results, n: int) -> list[list[Completion]]:
    """Per prompt, its n completions from TensorRT-LLM `RequestOutput`s (`outputs[j].token_ids`,
    `.logprobs` as one {token_id: Logprob} dict per token, `.finish_reason` "stop" / "length")."""
    out = []
    for result in results:
        if len(result.outputs) != n:
            raise ValueError(f"expected {n} completions per prompt, got {len(result.outputs)}")
        out.append([(list(c.token_ids), [_token_logprob(e, t) for e, t in zip(c.logprobs, c.token_ids)],
                     c.finish_reason == "stop") for c in result.outputs])
    return out


def completions_to_rollout(prompts: list[list[int]], per_prompt: list[list[Completion]], pad_id: int,
                           max_new_tokens: int, device) -> RolloutBatch:
    rows = [prompt for prompt, group in zip(prompts, per_prompt) for _ in group]
    flat = [c for group in per_prompt for c in group]
    return rollout_batch(rows, [c[0] for c in flat], [c[1] for c in flat], [c[2] for c in flat],
                         pad_id, max_new_tokens, device)


def _token_logprob(entry, token: int) -> float:
    if isinstance(entry, dict):  # {token_id: Logprob(logprob=..., rank=...)}
        value = entry[token]
        return float(getattr(value, "logprob", value))
    return float(entry)


class TRTLLMRolloutEngine:
    """See the module docstring. `weights()` yields the trainer's (hf_name, tensor) stream."""

    def __init__(self, opts: TRTLLMOptions, weights: Callable[[], Iterator[tuple[str, torch.Tensor]]],
                 bucket_bytes: int, eos_id: int, pad_id: int) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state

        require_tensorrt_llm()
        self.opts, self.weights, self.bucket_bytes = opts, weights, bucket_bytes
        self.eos_id, self.pad_id = eos_id, pad_id
        self.group = parallel_state.get_model_parallel_group()
        self.leader = dist.get_process_group_ranks(self.group)[0]
        self.is_leader = dist.get_rank() == self.leader
        self.loop = asyncio.new_event_loop()
        placement, node_groups = self._place()
        self.llm = self._run(self._build_llm(placement_kwargs(placement, node_groups))) if self.is_leader else None
        self.released: set[str] = set()  # tags whose memory is given back now

    def _run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def _place(self) -> tuple[EnginePlacement, dict]:
        """Collective over all ranks: every rank reports its GPU, rank 0 reserves the trainer nodes'
        GPUs in Ray and plans; each rank gets its group's placement and the placement groups."""
        import torch.distributed as dist
        from ray.util import get_node_ip_address

        slot = (get_node_ip_address(), device_key(torch.cuda.current_device()))
        world = dist.get_world_size()
        slots, groups = [None] * world, [None] * world
        dist.all_gather_object(slots, slot)
        dist.all_gather_object(groups, dist.get_process_group_ranks(self.group))
        box = [None]
        if dist.get_rank() == 0:
            try:
                box = [reserve_and_plan(sorted(set(map(tuple, groups))), slots, self.opts.tensor_parallel,
                                        WORKER_GPU_SHARE)]
            except Exception as exc:  # raised on every rank: the others wait in the broadcast
                box = [exc]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        plan, node_groups = box[0]
        if self.is_leader:
            connect_ray(local_ok=world == 1)
        return next(p for p in plan if dist.get_rank() in p.ranks), node_groups

    async def _build_llm(self, placement: dict):
        import inspect

        from tensorrt_llm import AsyncLLM
        from tensorrt_llm.llmapi import KvCacheConfig, QuantAlgo, QuantConfig

        if "placement_groups" not in inspect.signature(AsyncLLM.__init__).parameters:
            raise RuntimeError("this TensorRT-LLM's AsyncLLM takes no placement_groups (added by #9353 for "
                               "1.2): its workers could not be colocated with the trainer")
        kwargs = llm_kwargs(self.opts) | placement
        kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
        if "quant_config" in kwargs:
            kwargs["quant_config"] = QuantConfig(**{k: QuantAlgo[v] for k, v in kwargs["quant_config"].items()})
        return await AsyncLLM(**kwargs)

    def _gather_to_leader(self, obj):
        import torch.distributed as dist

        parts = [None] * dist.get_world_size(self.group) if self.is_leader else None
        dist.gather_object(obj, parts, dst=self.leader, group=self.group)
        return parts

    def update_weights(self) -> dict[str, float]:
        import torch.distributed as dist
        from tensorrt_llm._torch.utils import get_device_uuid

        self._resume(WEIGHT_TAGS)  # the refit writes into the weights: they must be resident
        uuid = get_device_uuid(torch.cuda.current_device())

        def push(bucket: Bucket) -> None:
            parts = self._gather_to_leader(serialize_handles(bucket, uuid))
            if self.is_leader:
                self._run(self.llm.update_weights({k: v for part in parts for k, v in part.items()}))
            dist.barrier(group=self.group)  # the bucket's tensors may be freed only after this

        metrics = refit(self.weights(), self.bucket_bytes, push)
        if self.is_leader:
            self._run(self.llm.update_weights(None))
        dist.barrier(group=self.group)
        return metrics

    def _resume(self, tags: tuple[str, ...]) -> None:
        todo = [t for t in tags if t in self.released]
        if todo and self.is_leader:
            self._run(self.llm.resume(todo))
        self.released -= set(todo)

    def sleep(self) -> None:
        """Release weights and KV cache while the trainer runs (the next refit rewrites the weights)."""
        todo = [t for t in WEIGHT_TAGS + KV_CACHE_TAGS if t not in self.released]
        if todo and self.is_leader:
            self._run(self.llm.release(todo))
        self.released |= set(todo)

    def wake(self) -> None:
        self._resume(WEIGHT_TAGS + KV_CACHE_TAGS)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | Sequence[int]) -> RolloutBatch:
        import torch.distributed as dist
        from tensorrt_llm import SamplingParams as TRTSamplingParams

        seeds = request_seeds(seed, len(prompts))
        box = [None]
        if self.is_leader:
            async def run_all():
                requests = [self.llm.generate_async(prompt, TRTSamplingParams(
                    **sampling_kwargs(params, s, self.eos_id, self.pad_id))) for prompt, s in zip(prompts, seeds)]
                return await asyncio.gather(*requests)

            box = [completions(self._run(run_all()), params.n)]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return completions_to_rollout(prompts, box[0], self.pad_id, params.max_new_tokens,
                                      torch.cuda.current_device())


def require_tensorrt_llm() -> None:
    """Import TensorRT-LLM and refuse any version but the pinned one (its RL APIs move quickly)."""
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise RuntimeError("rollout.engine=trtllm needs TensorRT-LLM (the NGC image "
                           "nvcr.io/nvidia/tensorrt-llm/release:1.2.0); it is not importable here") from exc
    version = getattr(tensorrt_llm, "__version__", "?")
    if not version.startswith(PINNED_VERSION + "."):
        raise RuntimeError(f"TensorRT-LLM {version} found; the adapter is written against {PINNED_VERSION}.x")
