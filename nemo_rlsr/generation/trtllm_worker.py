"""`rollout.engine: trtllm` with `rollout.placement: separate`: TensorRT-LLM engines on GPUs the
trainer does not use, fed prompts by the trainer's rank 0 and refitted over NCCL after every
optimizer step (asynchronous GRPO, trainer/async_rollouts.py). Written against TensorRT-LLM 1.2 and
never run: no GPU and no TensorRT-LLM here (generation/trtllm.py says what was read, and where).

Layout. `rollout.gpus` GPUs of the Ray cluster, in engines of E = `rollout.tensor_parallel` GPUs.
Each engine is one STRICT_PACK placement group of E one-GPU bundles (an engine's tensor-parallel
all-reduces stay inside a node); one Ray actor, `_TRTLLMWorker`, asks for no CPU and no GPU (it only
drives the engines) and holds one `TRTLLMLeader` (generation/trtllm.py) per engine. The Ray cluster
must hold the rollout GPUs and not the trainer's (`RAY_ADDRESS` / reward.ray_address; docs/refit.md):
Ray knows nothing of the GPUs torchrun gave the trainer.

Refit. Each engine's Ray GPU workers carry our extension (generation/trtllm_refit_ext.py). The
refit group: the trainer's rank 0 is rank 0, engine j's worker r (its rank in the engine's own
group) is 1 + j*E + r. The actor's `join` and `receive` call every engine at once (one thread per
engine: a broadcast completes only when every member has entered it), then each engine finalises
with TensorRT-LLM's own `update_weights(None)`. The trainer's side is weight_sync/refit_sender.py,
shared with our torch worker: every worker receives the whole HF-named model (TensorRT-LLM's loader
cuts its tensor-parallel part), one bucket of `rollout.refit_bucket_mb` at a time.

Generation. A generate call's prompts (one trainer rank's, with their seeds) are cut into one
contiguous share per engine (trtllm_cells.shares), generated concurrently and put back in prompt
order. The rollout's tensors are on the CPU (the actor has no GPU); the trainer moves them to its
device. TensorRT-LLM's sampler ignores per-request seeds (generation/factory.py), so a staleness-0
run matches a colocated one only in distribution.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from nemo_rlsr.config import RLSRConfig
from nemo_rlsr.distributed.local_ray import NAMESPACE, connect_ray
from nemo_rlsr.generation.factory import engine_gpus, write_model_dir
from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.rollout_worker import Generated, RolloutWorker, VersionedWork, named_hf_tensors
from nemo_rlsr.generation.trtllm import WORKER_GPU_SHARE, TRTLLMLeader, TRTLLMOptions
from nemo_rlsr.generation.trtllm_cells import own_completions, shares
from nemo_rlsr.generation.trtllm_refit_ext import EXTENSION_QUALNAME
from nemo_rlsr.generation.trtllm_requests import completions_to_rollout
from nemo_rlsr.weight_sync.refit_sender import RefitSender

T = TypeVar("T")
# The engines' workers pick their GPU from ray.get_gpu_ids() on a node whose GPUs they all see
# (tensorrt_llm/executor/ray_gpu_worker.py; generation/trtllm_placement.py for the colocated case).
# Set on the actor, it reaches the workers: TensorRT-LLM's RayExecutor copies os.environ into them.
WORKER_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
# Of the memory left once the weights are in: the GPUs are the engine's alone, but each worker also
# holds a refit bucket (rollout.refit_bucket_mb) and NCCL's buffers (ASSUMED; not measured on a GPU).
SEPARATE_KV_CACHE_FRACTION = 0.8


def engine_placement(group, gpus: int) -> dict:
    """AsyncLLM's placement arguments for an engine on all `gpus` bundles of one placement group."""
    return {"placement_groups": [group], "placement_bundle_indices": [list(range(gpus))],
            "per_worker_gpu_share": WORKER_GPU_SHARE}


def group_ranks(engines: int, gpus: int) -> list[list[int]]:
    """Each engine's workers' ranks in the refit group (rank 0 is the trainer's rank 0)."""
    return [list(range(1 + j * gpus, 1 + (j + 1) * gpus)) for j in range(engines)]


class _TRTLLMWorker:
    """The body of the actor: one TRTLLMLeader per engine. `backend`: the refit group's (nccl; a test
    without GPUs passes gloo)."""

    def __init__(self, opts: TRTLLMOptions, engines: int, eos_id: int, pad_id: int, timeout_s: float,
                 backend: str = "nccl") -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.opts, self.eos_id, self.pad_id, self.backend = opts, eos_id, pad_id, backend
        self.leaders: list[TRTLLMLeader] = []
        self.pool = ThreadPoolExecutor(engines, thread_name_prefix="engine")
        self.work = VersionedWork()
        gpus = opts.tensor_parallel
        total, free = ray.cluster_resources().get("GPU", 0), ray.available_resources().get("GPU", 0)
        self.groups = [placement_group([{"GPU": 1}] * gpus, strategy="STRICT_PACK") for _ in range(engines)]
        try:
            _, pending = ray.wait([g.ready() for g in self.groups], num_returns=engines, timeout=timeout_s)
            if pending:
                raise RuntimeError(f"rollout.gpus: {engines} engine(s) of {gpus} GPU(s) on one node each could not be "
                                   f"placed within {timeout_s:.0f} s; the Ray cluster had {total:g} GPU(s), {free:g} "
                                   f"free")
            # one after the other: each leader hides the launcher's variables in os.environ while it builds
            for group in self.groups:
                self.leaders.append(TRTLLMLeader(opts, engine_placement(group, gpus)))
        except BaseException:
            self.close()  # the GPUs reserved so far go back (Ray keeps them while the trainer's job lives)
            raise

    def _each(self, call: Callable[[int, TRTLLMLeader], T]) -> list[T]:
        """`call(j, leader)` for every engine at once; the results in engine order."""
        futures = [self.pool.submit(call, j, leader) for j, leader in enumerate(self.leaders)]
        return [future.result() for future in futures]

    def join(self, host: str, port: int, world: int, timeout_s: float) -> list[list[int]]:
        """Every engine worker joins the trainer's refit group; returns their ranks per engine."""
        ranks = group_ranks(len(self.leaders), self.opts.tensor_parallel)
        joined = self._each(lambda j, leader: leader.call_workers(
            "nemo_rlsr_join", host, port, ranks[j][0], world, timeout_s, self.backend))
        if joined != ranks:  # a worker's rank in its engine is not its place in the engine's bundles
            raise RuntimeError(f"the engines' workers joined the refit group as {joined}, expected {ranks}")
        return joined

    def receive(self, version: int) -> float:
        """Every engine receives refit `version` and finalises it; returns the seconds it took."""
        def refit(j: int, leader: TRTLLMLeader) -> None:
            leader.call_workers("nemo_rlsr_receive", version)
            leader.update_weights(None)  # TensorRT-LLM's finalisation (rlhf_utils.WorkerExtension)

        return self.work.receive(version, lambda: self._each(refit))

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> Generated:
        return self.work.generate(lambda: self._generate(prompts, params, seeds))

    def _generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> RolloutBatch:
        work = shares([len(prompts)], len(self.leaders))

        def share(j: int, leader: TRTLLMLeader) -> list:
            mine = [prompt for _, prompt in work[j]]
            if not mine:
                return []
            return leader.generate([prompts[i] for i in mine], params, [seeds[i] for i in mine], self.eos_id,
                                   self.pad_id)

        per_prompt = own_completions(work, self._each(share), 0, len(prompts))
        return completions_to_rollout(prompts, per_prompt, self.pad_id, params.max_new_tokens, "cpu")

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Shut the engines down and give their GPUs back (placement groups outlive the actor while
        the trainer's Ray job lives)."""
        from ray.util.placement_group import remove_placement_group

        for leader in self.leaders:
            leader.close()
        for group in self.groups:
            remove_placement_group(group)
        self.leaders, self.groups = [], []
        self.pool.shutdown()


def separate_options(cfg: RLSRConfig, model_dir: Path, dp: int) -> TRTLLMOptions:
    """One engine's options: E = engine_gpus(cfg) GPUs; a batch of the rows one generate call
    (one trainer rank's prompts) gives each engine."""
    gpus = engine_gpus(cfg)
    prompts = cfg.grpo.prompts_per_step // dp  # shared out whole (trtllm_cells.shares)
    per_engine = -(-prompts // (cfg.rollout.gpus // gpus)) * cfg.grpo.num_generations
    return TRTLLMOptions(
        model_dir=str(model_dir), tensor_parallel=gpus, expert_parallel=cfg.rollout.expert_parallel,
        max_batch_size=per_engine, max_seq_len=cfg.model.max_sequence_length,
        max_input_len=cfg.model.max_sequence_length - cfg.rollout.max_new_tokens,
        kv_cache_fraction=SEPARATE_KV_CACHE_FRACTION, worker_extension=EXTENSION_QUALNAME, sleep=False)


def trtllm_rollout_worker(cfg: RLSRConfig, adapter, tokenizer, run_dir, dp: int) -> RolloutWorker:
    """The engines' actor and its client, on trainer rank 0 (a CUDA device is current)."""
    import ray

    address = cfg.reward.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None:
        raise RuntimeError("rollout.engine=trtllm with rollout.placement=separate needs a Ray cluster that holds the "
                           "rollout GPUs and not the trainer's: set RAY_ADDRESS or reward.ray_address (docs/refit.md)")
    started_ray = connect_ray(address, 1)
    opts = separate_options(cfg, write_model_dir(cfg, adapter, tokenizer, run_dir), dp)
    engines = cfg.rollout.gpus // opts.tensor_parallel
    timeout_s = cfg.parallel.collective_timeout_s
    actor = ray.remote(_TRTLLMWorker).options(num_cpus=0, num_gpus=0, namespace=NAMESPACE,
                                              runtime_env={"env_vars": WORKER_ENV}).remote(
        opts, engines, tokenizer.eos_id, tokenizer.pad_id, timeout_s)
    sender = RefitSender(named_hf_tensors(adapter, cfg.model, tokenizer.vocab_size),
                         ray.util.get_node_ip_address(), 1 + cfg.rollout.gpus, "nccl",
                         cfg.rollout.refit_bucket_mb * 2**20, timeout_s)
    return RolloutWorker(actor, sender, started_ray)
