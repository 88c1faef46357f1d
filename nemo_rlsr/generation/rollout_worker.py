"""`rollout.placement: separate`: a rollout actor with its own copy of the model, and its client.

`RolloutWorker` is the trainer's client of any such actor: ours below (`torch_rollout_worker`: our
torch sampler, CPU) or TensorRT-LLM engines on GPUs of their own (generation/trtllm_worker.py).

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
from nemo_rlsr.weight_sync.broadcast import LAYOUT, RefitGroup, receive_refit
from nemo_rlsr.weight_sync.refit_sender import RefitSender

LOOPBACK = "127.0.0.1"  # the torch worker is pinned to global rank 0's node
CLOSE_TIMEOUT_S = 120


@dataclass
class Generated:
    """One generate call's result: the rollouts, the policy version whose weights sampled them, the
    seconds the worker sat without work between the previous generate and this one (refits not
    counted) and the seconds it generated."""

    batch: RolloutBatch
    version: int
    idle_s: float
    generate_s: float


class VersionedWork:
    """A rollout actor's policy version and its idle time (the seconds between calls)."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.free_since = time.perf_counter()  # the end of the last call
        self.idle = 0.0  # seconds without a call since the last generate ended

    def receive(self, version: int, load: Callable[[], object]) -> float:
        """Run `load` (a refit's receive) as `version`; returns the seconds it took."""
        start = time.perf_counter()
        load()
        self.version = version
        self.idle += start - self.free_since
        self.free_since = time.perf_counter()
        return self.free_since - start

    def generate(self, run: Callable[[], RolloutBatch]) -> Generated:
        if self.version is None:
            raise RuntimeError("the rollout worker has no weights yet: refit it before generating")
        start = time.perf_counter()
        batch = run()
        end = time.perf_counter()
        idle = self.idle + start - self.free_since
        self.idle, self.free_since = 0.0, end
        return Generated(batch, self.version, idle, end - start)


class _TorchWorker:
    """The body of the torch rollout actor (runs in its own process)."""

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
        self.work = VersionedWork()

    def join(self, host: str, port: int, world: int, timeout_s: float) -> None:
        """Join the trainer's refit group (rank 1 of 2) and read the stream's manifest and plan."""
        self.group = RefitGroup.create(host, port, 1, world, "gloo", timeout_s)
        self.manifest, self.plan = self.group.fetch(LAYOUT)

    def receive(self, version: int) -> float:
        """Receive and load the trainer's weights of `version`; returns the seconds it took."""
        return self.work.receive(version, lambda: self._load(version))

    def _load(self, version: int) -> None:
        from nemo_rlsr.models.hf.load import TensorDictReader, load_hf_weights

        self.group.signal_ready(version)
        received: dict[str, torch.Tensor] = {}
        receive_refit(self.group, self.manifest, self.plan, received.update)  # each bucket in its own buffer
        load_hf_weights(self.module, self.adapter, self.hf_cfg, TensorDictReader(received, f"refit {version}"))

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> Generated:
        return self.work.generate(lambda: self.engine.generate(prompts, params, seeds))

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


class RolloutWorker:
    """Client of one rollout actor (`join`, `receive`, `generate`, `pid`, `close` as `_TorchWorker`'s):
    `refit` and `submit` return at once, `result` waits."""

    def __init__(self, actor, sender: RefitSender, started_ray: bool) -> None:
        import ray

        self.actor, self.sender, self._started_ray = actor, sender, started_ray
        # the actor's start-up (engines: minutes) ends here, and its error is raised here, not seen
        # later as receivers that never joined the refit group
        ray.get(actor.pid.remote())

    def refit(self, module: torch.nn.Module, version: int, stopping: Callable[[], bool] = lambda: False
              ) -> dict[str, float]:
        """Send `module`'s weights as `version` once the actor is ready for them (after the calls
        queued before this one): weight_sync/refit_sender.py. The first call sets the group up."""
        if self.sender.group is None:
            self.sender.join(module, lambda host, port: self.actor.join.remote(host, port, self.sender.world,
                                                                              self.sender.timeout_s))
        return self.sender.send(module, version, self.actor.receive.remote(version), stopping)

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
            try:  # the actor gives back what it holds (engines' GPUs), then goes
                ray.get(self.actor.close.remote(), timeout=CLOSE_TIMEOUT_S)
            except ray.exceptions.RayError:
                pass  # dead already, or stuck: killed below either way
            ray.kill(self.actor)
        self.sender.close()
        if self._started_ray:
            ray.shutdown()


def named_hf_tensors(adapter, model: ModelConfig, vocab_size: int):
    """The refit stream of a module: its HF-named tensors (weight_sync/source.py)."""
    from nemo_rlsr.weight_sync.source import hf_named_tensors

    hf_cfg = dataclasses.replace(model, vocab_size=vocab_size)
    return lambda module: hf_named_tensors(module, adapter, hf_cfg, vocab_size)


def torch_rollout_worker(model: ModelConfig, adapter, tokenizer, seed: int, bucket_mb: int, timeout_s: float,
                         ray_address: str | None = None) -> RolloutWorker:
    """Our torch sampler in a Ray actor on this node, refitted over gloo."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started_ray = connect_ray(ray_address, 1)
    # on this node: the refit group's store listens on loopback, even under a cluster's Ray
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(_TorchWorker).options(num_cpus=0, namespace=NAMESPACE, scheduling_strategy=here).remote(
        model, adapter, tokenizer, seed, torch.get_num_threads())
    sender = RefitSender(named_hf_tensors(adapter, model, tokenizer.vocab_size), LOOPBACK, 2, "gloo",
                         bucket_mb * 2**20, timeout_s)
    return RolloutWorker(actor, sender, started_ray)
