"""`rollout.placement: separate`: our torch sampler in a Ray actor with its own copy of the model.

Why a process of its own: the trainer's module cannot sample while it trains, so a colocated
engine's generation and the trainer's logprob and update passes take turns. A worker with its own
copy generates step k+1's rollouts while the trainer trains step k (trainer/async_rollouts.py).

How it behaves:

* The actor builds the policy's GPTModel from the same ModelConfig, in a one-rank gloo process group
  of its own (a fresh rendezvous port: the variables it inherits name the trainer's), with the
  trainer's torch thread count: the same weights then give the same logits bit for bit, hence the
  same tokens as the colocated engine (the staleness-0 digest test shows it).
* A refit is the trainer's weights under a policy version (the number of optimizer steps they have
  had), broadcast from the trainer's rank 0 over a process group of the two processes
  (weight_sync/broadcast.py: the HF-named stream of weight_sync/source.py, in buckets of
  rollout.refit_bucket_mb) and loaded through the HF loader (models/hf/load.py): the bytes an
  engine on other GPUs or nodes can receive too (docs/refit.md). Nothing of it goes through Ray's
  object store.
* The actor runs its calls one at a time, in the order they were sent: a generate sent after a
  refit samples on that refit's weights, and generation stops only while a refit loads. The
  trainer asks for a refit, then waits until the actor reaches it (it signals on the group's
  store; `async/refit_wait_s`: under max_staleness >= 1 the worker is finishing the next step's
  rollouts then) and only then sends, so the bytes never wait behind a generate. Each result
  carries the version that produced it, and the actor's idle time before it (waiting for work).
* Ray is joined, or started on loopback (distributed/local_ray.py). The actor asks for no Ray CPU:
  its threads are the trainer's thread count, and a local Ray sized for the reward actors would
  otherwise never schedule it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from nemo_rlsr.config import ModelConfig
from nemo_rlsr.distributed.local_ray import NAMESPACE, connect_ray
from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.weight_sync.broadcast import LAYOUT, RefitGroup, bucket_plan, manifest_of, receive_refit, send_refit

HOST = "127.0.0.1"  # the worker is pinned to global rank 0's node


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

    def __init__(self, model: ModelConfig, adapter, tokenizer, seed: int, threads: int) -> None:
        from nemo_rlsr.distributed.dims import ParallelDims
        from nemo_rlsr.distributed.parallel import free_port, init_distributed
        from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
        from nemo_rlsr.models.gpt import build_gpt

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        # Under torchrun the actor inherits rank 0's TORCHELASTIC_USE_AGENT_STORE=True, which makes an
        # env:// rendezvous join the launcher's store as a client (torch/distributed/rendezvous.py,
        # `_create_c10d_store`) on the port just replaced, where no store listens: it would wait forever.
        for key in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:
            del os.environ[key]
        torch.set_num_threads(threads)
        ctx = init_distributed(ParallelDims(seed=seed))
        self.module = build_gpt(model, tokenizer.vocab_size, ctx)
        self.adapter, self.hf_cfg = adapter, dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
        self.group: RefitGroup | None = None
        self.engine = TorchRolloutEngine(self.module, tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size,
                                         detokenize=tokenizer.decode)
        self.version: int | None = None
        self.free_since = time.perf_counter()  # the end of the last call
        self.idle = 0.0  # seconds without a call since the last generate ended

    def join(self, port: int, timeout_s: float) -> None:
        """Join the trainer's refit group (rank 1 of 2) and read the stream's manifest and plan."""
        self.group = RefitGroup.create(HOST, port, 1, 2, "gloo", timeout_s)
        self.manifest, self.plan = self.group.fetch(LAYOUT)

    def receive(self, version: int) -> float:
        """Receive and load the trainer's weights of `version`; returns the seconds it took."""
        from nemo_rlsr.models.hf.load import TensorDictReader, load_hf_weights

        start = time.perf_counter()
        self.group.signal_ready(version)
        received: dict[str, torch.Tensor] = {}
        receive_refit(self.group, self.manifest, self.plan, received.update)  # each bucket in its own buffer
        load_hf_weights(self.module, self.adapter, self.hf_cfg, TensorDictReader(received, f"refit {version}"))
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

    def __init__(self, model: ModelConfig, adapter, tokenizer, seed: int, bucket_mb: int, timeout_s: float,
                 ray_address: str | None = None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.adapter, self.hf_cfg = adapter, dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
        self.bucket_bytes, self.timeout_s = bucket_mb * 2**20, timeout_s
        self.group: RefitGroup | None = None
        self._started_ray = connect_ray(ray_address, 1)
        # on this node: the refit group's store listens on loopback (HOST), even under a cluster's Ray
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = ray.remote(_Worker).options(num_cpus=0, namespace=NAMESPACE, scheduling_strategy=here).remote(
            model, adapter, tokenizer, seed, torch.get_num_threads())

    def _named(self, module):
        from nemo_rlsr.weight_sync.source import hf_named_tensors

        return hf_named_tensors(module, self.adapter, self.hf_cfg, self.hf_cfg.vocab_size)

    def _join(self, module) -> None:
        """Set up the refit group: the manifest is the stream's now (one pass), fixed for the run."""
        import ray

        from nemo_rlsr.distributed.parallel import free_port

        manifest = manifest_of((name, t.detach()) for name, t in self._named(module))
        self.manifest, self.plan = manifest, bucket_plan(manifest, self.bucket_bytes)
        port = free_port()
        joined = self.actor.join.remote(port, self.timeout_s)
        self.group = RefitGroup.create(HOST, port, 0, 2, "gloo", self.timeout_s)
        self.group.publish(LAYOUT, (self.manifest, self.plan))
        ray.get(joined)

    def refit(self, module: torch.nn.Module, version: int, stopping: Callable[[], bool] = lambda: False
              ) -> dict[str, float]:
        """Send `module`'s weights as `version` once the actor is ready for them (after the calls
        queued before this one); returns refit/seconds, refit/gib, refit/buckets (the broadcast) and
        async/refit_wait_s (waiting for the actor). Sends nothing if `stopping()` turns true while
        waiting (a preemption: the run ends after this step and the actor is killed)."""
        import ray

        if self.group is None:
            self._join(module)
        start = time.perf_counter()
        try:
            received = self.actor.receive.remote(version)
            poll = 0.001  # doubling to 50 ms: an idle actor answers within a millisecond or two
            while not self.group.all_ready(version):
                if stopping():
                    return {}
                done, _ = ray.wait([received], timeout=poll)
                if done:  # the actor failed before it signalled: raise its error
                    ray.get(received)
                poll = min(2 * poll, 0.05)
            waited = time.perf_counter() - start
            with torch.no_grad():
                sent = send_refit(self.group, ((n, t.detach()) for n, t in self._named(module)), self.manifest,
                                  self.plan)
        except Exception:
            if stopping():  # the actor (or Ray) went down with the preemption signal: the run ends anyway
                return {}
            raise
        return sent | {"async/refit_wait_s": waited}

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
        if self.group is not None:
            self.group.close()
        if self._started_ray:
            ray.shutdown()
