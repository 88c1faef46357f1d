"""TensorRT-LLM rollout engine (PyTorch backend), written against TensorRT-LLM 1.2.0 and never run here.

Pinned: 1.2.0, the version of our base image nvcr.io/nvidia/tensorrt-llm/release:1.2.0 (not installable
on our CPU machines, so every name below was checked by reading NVIDIA/TensorRT-LLM's source, not by
running it). The v1.2.0 tag itself could not be checked out here (the repository snapshot is too large to
fetch); the files read are the stored versions of the 1.2 line and the commit that introduced the RL
placement API, 89dabf5aa1 "[TRTLLM-9736][feat] AsyncLLM and verl integ (#9353)", 2025-12-11, before the
1.2.0rc6 / 1.2.0 release branch. `TRTLLMLeader` checks the installed AsyncLLM's signature, so a 1.2.0
without that API fails with a clear error instead of silently placing workers elsewhere.

* tensorrt_llm/_torch/async_llm.py: `AsyncLLM(placement_groups, placement_bundle_indices,
  per_worker_gpu_share, **llm_args)` wraps them in `RayPlacementConfig(defer_workers_init=True, ...)`,
  forces orchestrator_type="ray" and allreduce_strategy="NCCL", defaults ray_worker_extension_cls to
  rlhf_utils.WorkerExtension; `await llm` runs `setup_async` (workers + engines). `release(tags)` /
  `resume(tags)` call the workers' sleep / wakeup; `update_weights(dict | None)`.
* tensorrt_llm/llmapi/llm_args.py: `RayPlacementConfig` (above), `enable_sleep`, `load_format`
  ("dummy", upper-cased into LoadFormat), `KvCacheConfig(enable_block_reuse, free_gpu_memory_fraction)`,
  `max_input_len` (default 1024: longer prompts are refused, so it is always set from our options).
* tensorrt_llm/_utils.py: `from mpi4py import MPI` and `pkl5.Intracomm(MPI.COMM_WORLD)` at module level,
  i.e. MPI_Init on import, which `TLLM_DISABLE_MPI` does not govern (it only switches functions such as
  mpi_rank). Under srun/PMIx an MPI_Init in one rank would try to join the step's PMIx job. Hence: only
  the engine leaders import TensorRT-LLM (`TRTLLMLeader`, built on leaders only), and they import it with
  the launcher's variables hidden (`import_tensorrt_llm`), so MPI comes up as a singleton.
* tensorrt_llm/executor/ray_executor.py: `create_workers` gives every worker `os.environ.copy()` (plus
  TLLM_DISABLE_MPI, MASTER_ADDR/PORT): the leader's SLURM_*, PMI*/PMIX*, OMPI_*, torchrun variables and
  CUDA_VISIBLE_DEVICES would reach workers on other GPUs. The leader builds its AsyncLLM inside
  `launcher_hidden()`; each worker's GPU comes from its placement bundle (trtllm_placement.py). With
  `placement_groups` set, worker i is created with num_gpus=per_worker_gpu_share in bundle
  `placement_bundle_indices` (flattened) of its group; the placement groups passed in are not removed at
  shutdown. llmapi/llm.py sets TLLM_DISABLE_MPI=1 for the Ray orchestrator and executor/result.py reads
  it at run time, so it stays set in the leader's process.
* tensorrt_llm/executor/ray_gpu_worker.py: a worker uses `ray.get_gpu_ids()[0]` as its GPU.
* tensorrt_llm/llmapi/rlhf_utils.py: `WorkerExtension.update_weights({device_uuid:
  base64(pickle([(hf_name, (rebuild_fn, args)), ...]))})` keeps only its own device's entry, rebuilds each
  tensor with args[6] = its device and reloads it (partial loading); `update_weights(None)` finalises
  (post-load hooks, prefix-cache reset). The key is tensorrt_llm/_torch/utils.py `get_device_uuid`:
  "GPU-" + torch's device uuid, which every rank computes with torch alone (`refit_device_key`).
* tensorrt_llm/_torch/virtual_memory.py: `ExecutorMemoryType`, the tags release/resume accept (its
  values moved between versions, e.g. "model_weights" was added): `memory_tags` derives ours from the
  installed enum.
* Requests and outputs: trtllm_requests.py (EOS kept as a stop token, greedy n > 1 split into requests).

Placement (trtllm_placement.py): an engine of tensor_parallel_size E = rollout.tensor_parallel on E
trainer GPUs, laid out independently of the trainer (weight_sync/engine_slices.engine_groups: E
divides TP x PP, several engines per model-parallel group, or is a multiple of it, one engine over
whole data-parallel replicas); its Ray workers sit on exactly those GPUs, because a worker only opens
the IPC handles of its own device. Rank 0 reserves every GPU of the trainer nodes as one-GPU bundles,
reads which GPU each bundle holds and hands each engine's leader its bundles. Refit: every rank
receives only the part of each HF tensor that the worker on its GPU loads (weight_sync/shard_refit.py)
and hands it over as a full-shaped tensor (TensorRT-LLM's loader cuts its part itself); the leader
gathers the workers' IPC handles and makes the call. Generation: the engines of a cell
(trtllm_cells.py) share out the cell's prompts.

Only the pure parts (options, placement plan, sampling arguments, handle serialisation, output
conversion, memory tags, the import and worker environment) run without TensorRT-LLM;
tests/test_rollout_engines.py and tests/test_trtllm_placement.py check them (the placement's Ray calls
against a local Ray with logical GPUs). FP8 rollout is refused (generation/factory.engine_problems):
nothing shows TensorRT-LLM's loader quantizing the bf16 weights a refit sends.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.sampling import request_seeds
from nemo_rlsr.generation.trtllm_cells import cells, own_completions, shares
from nemo_rlsr.generation.trtllm_placement import EnginePlacement, connect_ray, device_key, reserve_and_plan
from nemo_rlsr.generation.trtllm_requests import completions, completions_to_rollout, request_plan
from nemo_rlsr.weight_sync.buckets import Bucket, refit
from nemo_rlsr.weight_sync.shard_refit import ShardRefit

PINNED_VERSION = "1.2"
# What srun/PMIx, Open MPI and torchrun put in a trainer rank's environment: an MPI_Init that sees
# them joins the launcher's job, and a Ray worker that inherits them believes it is that rank.
LAUNCHER_PREFIXES = ("SLURM_", "PMI", "OMPI_", "PRTE_", "TORCHELASTIC_")
LAUNCHER_NAMES = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_launcher_variable(name: str) -> bool:
    return name.startswith(LAUNCHER_PREFIXES) or name in LAUNCHER_NAMES


@contextmanager
def launcher_hidden() -> Iterator[None]:
    """os.environ without the launcher's variables for the duration (they are put back after)."""
    hidden = {k: v for k, v in os.environ.items() if is_launcher_variable(k)}
    for key in hidden:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(hidden)


def import_tensorrt_llm():
    """Import TensorRT-LLM (engine leaders only) as a singleton MPI process, and refuse any version but
    the pinned one (its RL APIs move quickly)."""
    os.environ["TLLM_DISABLE_MPI"] = "1"  # the Ray orchestrator's mode; TensorRT-LLM reads it at run time
    with launcher_hidden():
        try:
            import tensorrt_llm
        except ImportError as exc:
            raise RuntimeError("rollout.engine=trtllm needs TensorRT-LLM (the NGC image "
                               "nvcr.io/nvidia/tensorrt-llm/release:1.2.0); it is not importable here") from exc
    version = getattr(tensorrt_llm, "__version__", "?")
    if not version.startswith(PINNED_VERSION + "."):
        raise RuntimeError(f"TensorRT-LLM {version} found; the adapter is written against {PINNED_VERSION}.x")
    return tensorrt_llm


def memory_tags(values: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(weight tags, KV-cache tags) from the values of the installed ExecutorMemoryType. Everything but
    the KV cache holds weights or buffers that must be back before a refit writes into them; the
    `_no_capture_*` values tag memory of the start-up KV-cache estimate, which sleep does not hold."""
    values = [v for v in values if not v.startswith("_no_capture")]
    if "kv_cache" not in values:
        raise RuntimeError(f"ExecutorMemoryType has no kv_cache tag ({values}): not the TensorRT-LLM this "
                           f"adapter was written for")
    return tuple(v for v in values if v != "kv_cache"), ("kv_cache",)


def refit_device_key(index: int) -> str:
    """The key of `cuda:index` in a refit's {device_uuid: handles} dict: TensorRT-LLM's get_device_uuid."""
    return "GPU-" + device_key(index)


@dataclass(frozen=True)
class TRTLLMOptions:
    model_dir: str  # an HF directory with config.json (weights come from the first refit)
    tensor_parallel: int
    max_batch_size: int
    max_seq_len: int
    max_input_len: int | None = None  # longest prompt; None: any that leaves room for one new token
    kv_cache_fraction: float = 0.5  # of the GPU memory left free once the weights are loaded
    expert_parallel: int = 1  # moe_expert_parallel_size (the experts' moe-TP is tensor_parallel / it)
    # the class mixed into every Ray GPU worker: TensorRT-LLM's own (CUDA IPC refits) or ours
    # (broadcast refits, generation/trtllm_refit_ext.py)
    worker_extension: str = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
    sleep: bool = True  # weights and KV cache can be released (colocated: the trainer needs the memory)

    def __post_init__(self) -> None:
        if (self.tensor_parallel < 1 or self.max_batch_size < 1 or self.max_seq_len < 2 or self.expert_parallel < 1
                or self.tensor_parallel % self.expert_parallel):
            raise ValueError(f"bad TensorRT-LLM options: {self}")
        if self.max_input_len is not None and not 1 <= self.max_input_len < self.max_seq_len:
            raise ValueError(f"max_input_len={self.max_input_len} must be in [1, max_seq_len={self.max_seq_len})")
        if not 0 < self.kv_cache_fraction < 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1), got {self.kv_cache_fraction}")


def llm_kwargs(opts: TRTLLMOptions) -> dict:
    """Keyword arguments of `AsyncLLM`, with its KvCacheConfig as a plain dict that TRTLLMLeader builds."""
    return {
        "model": opts.model_dir, "backend": "pytorch", "orchestrator_type": "ray",
        "ray_worker_extension_cls": opts.worker_extension,
        "tensor_parallel_size": opts.tensor_parallel, "moe_expert_parallel_size": opts.expert_parallel,
        "max_batch_size": opts.max_batch_size,
        "max_seq_len": opts.max_seq_len,
        "max_input_len": opts.max_seq_len - 1 if opts.max_input_len is None else opts.max_input_len,
        "enable_sleep": opts.sleep, "load_format": "dummy", "skip_tokenizer_init": True,
        # prefix reuse is what shares a prompt's KV cache among its n samples
        "kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": opts.kv_cache_fraction},
    }


# The trainer is outside Ray, so an engine worker is the only Ray user of its bundle's GPU.
WORKER_GPU_SHARE = 1.0


def placement_kwargs(placement: EnginePlacement, node_groups: dict) -> dict:
    """`AsyncLLM` placement arguments of one engine: its nodes' placement groups (`node_groups[node]`)
    and, per group, the bundle indices of its workers."""
    return {"placement_groups": [node_groups[node] for node in placement.nodes],
            "placement_bundle_indices": [list(b) for b in placement.bundle_indices],
            "per_worker_gpu_share": WORKER_GPU_SHARE}


def serialize_handles(bucket: Bucket, device_uuid: str) -> dict[str, str]:
    """{device_uuid: base64(pickle([(hf_name, (rebuild_fn, args)), ...]))}: one bucket as the
    WorkerExtension's `update_weights` reads it. The tensors must stay alive until the call returns."""
    from torch.multiprocessing.reductions import reduce_tensor

    handles = [(name, reduce_tensor(tensor.detach().contiguous())) for name, tensor in bucket]
    return {device_uuid: base64.b64encode(pickle.dumps(handles)).decode("ascii")}


class TRTLLMLeader:
    """The TensorRT-LLM side of one engine: its AsyncLLM and memory state, on the group's leader rank
    only (no other rank imports TensorRT-LLM). Every call runs on the engine's own event loop."""

    def __init__(self, opts: TRTLLMOptions, placement: dict) -> None:
        self.trtllm = import_tensorrt_llm()
        from tensorrt_llm._torch.virtual_memory import ExecutorMemoryType

        self.weight_tags, self.kv_tags = memory_tags(tag.value for tag in ExecutorMemoryType)
        self.loop = asyncio.new_event_loop()
        with launcher_hidden():  # RayExecutor copies os.environ into every worker it creates
            self.llm = self._run(self._build(opts, placement))
        self.released: set[str] = set()  # tags whose memory is given back now

    def _run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    async def _build(self, opts: TRTLLMOptions, placement: dict):
        import inspect

        from tensorrt_llm.llmapi import KvCacheConfig

        AsyncLLM = self.trtllm.AsyncLLM
        if "placement_groups" not in inspect.signature(AsyncLLM.__init__).parameters:
            raise RuntimeError("this TensorRT-LLM's AsyncLLM takes no placement_groups (added by #9353 for "
                               "1.2): its workers could not be colocated with the trainer")
        kwargs = llm_kwargs(opts) | placement
        kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
        return await AsyncLLM(**kwargs)

    def update_weights(self, handles: dict | None) -> None:
        """One bucket of {device_uuid: handles}, or None to finalise the refit."""
        self._run(self.llm.update_weights(handles))

    def call_workers(self, method: str, *args) -> list:
        """`method` of the worker extension on every worker of the engine; their results, in rank order
        (AsyncLLM.collective_rpc, tensorrt_llm/_torch/async_llm.py @0acd798d)."""
        return self._run(self.llm.collective_rpc(method, args=args))

    def release(self, tags: tuple[str, ...]) -> None:
        todo = [t for t in tags if t not in self.released]
        if todo:
            self._run(self.llm.release(todo))
        self.released |= set(todo)

    def resume(self, tags: tuple[str, ...]) -> None:
        todo = [t for t in tags if t in self.released]
        if todo:
            self._run(self.llm.resume(todo))
        self.released -= set(todo)

    def close(self) -> None:
        """Stop the engine's workers (`LLM.shutdown`, tensorrt_llm/llmapi/llm.py, which AsyncLLM
        inherits; synchronous, and also registered at exit) and its event loop."""
        self.llm.shutdown()
        self.loop.close()

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], eos_id: int,
                 pad_id: int):
        plan = request_plan(params, seeds, eos_id, pad_id)

        async def run_all():
            return await asyncio.gather(*[self.llm.generate_async(prompts[prompt], self.trtllm.SamplingParams(**kwargs))
                                          for prompt, kwargs in plan])

        return completions(self._run(run_all()), [prompt for prompt, _ in plan], len(prompts), params.n, eos_id)


class TRTLLMRolloutEngine:
    """See the module docstring. `make_refit()` builds the shard refit (a collective over all ranks,
    run once here): its engine groups are the engines, of `opts.tensor_parallel` workers each."""

    def __init__(self, opts: TRTLLMOptions, make_refit: Callable[[], ShardRefit], bucket_bytes: int,
                 eos_id: int, pad_id: int) -> None:
        import torch.distributed as dist

        self.opts, self.bucket_bytes = opts, bucket_bytes
        self.eos_id, self.pad_id = eos_id, pad_id
        self.refit = make_refit()
        me = dist.get_rank()
        self.engine_ranks = self.refit.engine_group
        self.group = _own_group(self.refit.groups, me)  # the engine's workers' ranks
        all_cells = cells(self.refit.model_parallel_groups, self.refit.groups)
        self.cell = next(c for c in all_cells if me in c)
        self.cell_group = _own_group(all_cells, me)
        self.leader_rank = self.engine_ranks[0]
        self.is_leader = me == self.leader_rank
        placement, node_groups = self._place()
        self.leader = None
        if self.is_leader:
            self.leader = TRTLLMLeader(opts, placement_kwargs(placement, node_groups))

    def _place(self) -> tuple[EnginePlacement, dict]:
        """Collective over all ranks: every rank reports its GPU, rank 0 reserves the trainer nodes'
        GPUs in Ray and plans; each rank gets its engine's placement and the placement groups."""
        import torch.distributed as dist
        from ray.util import get_node_ip_address

        slot = (get_node_ip_address(), device_key(torch.cuda.current_device()))
        world = dist.get_world_size()
        slots = [None] * world
        dist.all_gather_object(slots, slot)
        box = [None]
        if dist.get_rank() == 0:
            try:
                box = [reserve_and_plan(self.refit.groups, slots, self.opts.tensor_parallel, WORKER_GPU_SHARE)]
            except Exception as exc:  # raised on every rank: the others wait in the broadcast
                box = [exc]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        plan, node_groups = box[0]
        if self.is_leader:
            connect_ray(local_ok=world == 1)
        return next(p for p in plan if dist.get_rank() in p.ranks), node_groups

    def _gather_to_leader(self, obj):
        import torch.distributed as dist

        parts = [None] * dist.get_world_size(self.group) if self.is_leader else None
        dist.gather_object(obj, parts, dst=self.leader_rank, group=self.group)
        return parts

    def update_weights(self) -> dict[str, float]:
        """Shard-only refit (weight_sync/shard_refit.py): each worker's handles cover full-shaped
        tensors holding only the part its loader reads. Buckets are cut by full tensor bytes in the
        plan's order, the same on every rank, so an engine's workers push the same buckets."""
        import torch.distributed as dist

        if self.is_leader:  # the refit writes into the weights: they must be resident
            self.leader.resume(self.leader.weight_tags)
        key = refit_device_key(torch.cuda.current_device())

        def push(bucket: Bucket) -> None:
            tensors = [(name, part.materialize()) for name, part in bucket if part.need is not None]
            parts = self._gather_to_leader(serialize_handles(tensors, key))
            if self.is_leader:
                self.leader.update_weights({k: v for part in parts for k, v in part.items()})
            dist.barrier(group=self.group)  # the bucket's tensors may be freed only after this

        before = self.refit.received_bytes
        metrics = refit(self.refit.stream(), self.bucket_bytes, push,
                        size_of=lambda part: part.full_bytes, counted=lambda part: part.nbytes)
        if self.is_leader:
            self.leader.update_weights(None)
        dist.barrier(group=self.group)
        return metrics | {"refit/received_gib": (self.refit.received_bytes - before) / 2**30}

    def sleep(self) -> None:
        """Release weights and KV cache while the trainer runs (the next refit rewrites the weights)."""
        if self.is_leader:
            self.leader.release(self.leader.weight_tags + self.leader.kv_tags)

    def wake(self) -> None:
        if self.is_leader:
            self.leader.resume(self.leader.weight_tags + self.leader.kv_tags)

    def close(self) -> None:
        """Shut the engine down on its leader (the other ranks hold nothing of it)."""
        if self.is_leader:
            self.leader.close()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | Sequence[int]) -> RolloutBatch:
        """This rank's prompts (its model-parallel group's), generated by the engines of its cell
        (trtllm_cells.py): the cell's prompts are shared out among its engines, each leader generates
        its share, every rank takes back its own group's completions in prompt order."""
        import torch.distributed as dist

        mine = (min(dist.get_process_group_ranks(self._model_parallel_group())), prompts,
                request_seeds(seed, len(prompts)))
        everyone = [None] * len(self.cell)
        dist.all_gather_object(everyone, mine, group=self.cell_group)
        groups = sorted({first: (p, s) for first, p, s in everyone}.items())
        work = shares([len(p) for _, (p, _) in groups], len(self.engine_leaders))
        result = None
        if self.is_leader:
            share = work[self.engine_leaders.index(self.leader_rank)]
            share_prompts = [groups[g][1][0][i] for g, i in share]
            share_seeds = [groups[g][1][1][i] for g, i in share]
            result = self.leader.generate(share_prompts, params, share_seeds, self.eos_id, self.pad_id) if share else []
        results = [None] * len(self.cell)
        dist.all_gather_object(results, (self.leader_rank, result), group=self.cell_group)
        by_leader = dict((leader, r) for leader, r in results if r is not None)
        own = own_completions(work, [by_leader[leader] for leader in self.engine_leaders],
                              [first for first, _ in groups].index(mine[0]), len(prompts))
        return completions_to_rollout(prompts, own, self.pad_id, params.max_new_tokens, torch.cuda.current_device())

    @property
    def engine_leaders(self) -> list[int]:
        """The leaders of the cell's engines, in rank order (engine i of the cell takes share i)."""
        return sorted({g[0] for g in self.refit.groups if g[0] in self.cell})

    @staticmethod
    def _model_parallel_group():
        from megatron.core import parallel_state

        return parallel_state.get_model_parallel_group()


def _own_group(groups: list[list[int]], rank: int):
    """The process group of the one of `groups` that holds `rank` (every rank creates them all, in
    the same order, as torch.distributed.new_group requires)."""
    import torch.distributed as dist

    own = None
    for ranks in groups:
        group = dist.new_group(sorted(ranks))
        if rank in ranks:
            own = group
    return own
