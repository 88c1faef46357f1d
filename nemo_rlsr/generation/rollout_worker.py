"""`rollout.placement: separate`: our torch sampler in a Ray actor with its own copy of the model.

Why a process of its own: the trainer's module cannot sample while it trains, so a colocated
engine's generation and the trainer's logprob and update passes take turns. A worker with its own
copy generates step k+1's rollouts while the trainer trains step k (trainer/async_rollouts.py).

How it behaves:

* The actor builds the policy's GPTModel from the same ModelConfig, in a one-rank gloo process group
  of its own (a fresh rendezvous port: the variables it inherits name the trainer's), with the
  trainer's torch thread count: the same weights then give the same logits bit for bit, hence the
  same tokens as the colocated engine (the staleness-0 digest test shows it).
* A refit is the trainer's `state_dict()` under a policy version (the number of optimizer steps
  the weights have had), put into Ray's object store at once (a copy: the trainer may go on
  training) and loaded by the actor when it gets to it.
* The actor runs its calls one at a time, in the order they were sent: a generate sent after a
  refit samples on that refit's weights, and generation stops only while a refit loads. Each result
  carries the version that produced it, and the actor's idle time before it (waiting for work).
* Ray is joined, or started on loopback (distributed/local_ray.py). The actor asks for no Ray CPU:
  its threads are the trainer's thread count, and a local Ray sized for the reward actors would
  otherwise never schedule it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.distributed.local_ray import NAMESPACE, connect_ray
from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams


@dataclass
class Generated:
    """One generate call's result: the rollouts, the policy version whose weights sampled them, the
    seconds the worker sat without work between the previous generate and this one (refits not
    counted) and the seconds it generated."""

    batch: RolloutBatch
    version: int
    idle_s: float
    generate_s: float


class _Worker:
    """The body of the rollout actor (runs in its own process)."""

    def __init__(self, model: ModelConfig, tokenizer, seed: int, threads: int) -> None:
        from nemo_rlsr.distributed.dims import ParallelDims
        from nemo_rlsr.distributed.parallel import free_port, init_distributed
        from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
        from nemo_rlsr.models.gpt import build_gpt

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        torch.set_num_threads(threads)
        ctx = init_distributed(ParallelDims(seed=seed))
        self.module = build_gpt(model, tokenizer.vocab_size, ctx)
        self.engine = TorchRolloutEngine(self.module, tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size,
                                         detokenize=tokenizer.decode)
        self.version: int | None = None
        self.free_since = time.perf_counter()  # the end of the last call
        self.idle = 0.0  # seconds without a call since the last generate ended

    def load(self, state: dict[str, torch.Tensor], version: int) -> float:
        """Load the trainer's weights of `version`; returns the seconds it took."""
        start = time.perf_counter()
        self.module.load_state_dict(state, strict=True)
        self.version = version
        self.idle += start - self.free_since
        self.free_since = time.perf_counter()
        return self.free_since - start

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> Generated:
        if self.version is None:
            raise RuntimeError("the rollout worker has no weights yet: refit it before generating")
        start = time.perf_counter()
        batch = self.engine.generate(prompts, params, seeds)
        end = time.perf_counter()
        idle = self.idle + start - self.free_since
        self.idle, self.free_since = 0.0, end
        return Generated(batch, self.version, idle, end - start)

    def pid(self) -> int:
        return os.getpid()


class RolloutWorker:
    """Client of one rollout actor: `refit` and `submit` return at once, `result` waits."""

    def __init__(self, model: ModelConfig, tokenizer, seed: int, ray_address: str | None = None) -> None:
        import ray

        self._started_ray = connect_ray(ray_address, 1)
        self.actor = ray.remote(_Worker).options(num_cpus=0, namespace=NAMESPACE).remote(
            model, tokenizer, seed, torch.get_num_threads())

    def refit(self, module: torch.nn.Module, version: int) -> dict[str, float]:
        """Send `module`'s weights as `version`; returns refit/seconds (the trainer's side: the copy
        into the object store) and refit/gib."""
        import ray

        start = time.perf_counter()
        # megatron's `_extra_state` entries (None on the local spec) travel as they are
        state = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}
        self.actor.load.remote(ray.put(state), version)
        gib = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)) / 2**30
        return {"refit/seconds": time.perf_counter() - start, "refit/gib": gib}

    def submit(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]):
        """Queue a generate call behind everything sent before it; returns its Ray reference."""
        return self.actor.generate.remote(prompts, params, seeds)

    def result(self, ref) -> Generated:
        import ray

        return ray.get(ref)

    def pid(self) -> int:
        import ray

        return ray.get(self.actor.pid.remote())

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.kill(self.actor)
        if self._started_ray:
            ray.shutdown()
