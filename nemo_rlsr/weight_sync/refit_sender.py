"""Trainer rank 0's side of a broadcast refit to a rollout actor in another process: the one client
code of every separate rollout worker (generation/rollout_worker.py: our torch sampler; generation/
trtllm_worker.py: TensorRT-LLM engines on GPUs of their own).

The first refit sets the group up: the manifest is the stream's at that moment (one pass over it),
rank 0 hosts the store, the actor's receivers join while rank 0 does, and the (manifest, plan) are
published on the store for receivers no Ray call reaches. Each refit then asks the actor to receive
(a Ray call queued behind the generates sent before it), waits until every receiver has signalled
that it is inside that receive, and only then broadcasts: the bytes never wait behind a generate,
and a trainer on a GPU never spins in a collective while an engine is busy.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from nemo_rlsr.weight_sync.broadcast import LAYOUT, RefitGroup, bucket_plan, manifest_of, send_refit

NamedTensors = Callable[[torch.nn.Module], Iterable[tuple[str, torch.Tensor]]]
POLL_FIRST_S, POLL_MAX_S = 0.001, 0.05  # an idle actor answers within a millisecond or two


class RefitSender:
    """Group rank 0 of a refit group of `world` processes (the receivers are ranks 1..world-1)."""

    def __init__(self, named: NamedTensors, host: str, world: int, backend: str, bucket_bytes: int,
                 timeout_s: float) -> None:
        self.named, self.host, self.world, self.backend = named, host, world, backend
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group: RefitGroup | None = None
        # called before every pass over the stream: a model-parallel trainer's rank 0 announces the
        # pass to its peers (StreamPeers.announce), which must iterate the stream with it
        self.before_pass: Callable[[], None] = lambda: None

    def _stream(self, module: torch.nn.Module):
        self.before_pass()
        return ((name, t.detach()) for name, t in self.named(module))

    def join(self, module: torch.nn.Module, start_receivers: Callable[[str, int], object]) -> None:
        """Set the group up; `start_receivers(host, port)` starts the receivers' joins without
        waiting for them (a Ray reference: they return once the group is whole)."""
        import ray

        from nemo_rlsr.distributed.parallel import free_port

        with torch.no_grad():
            self.manifest = manifest_of(self._stream(module))
        self.plan = bucket_plan(self.manifest, self.bucket_bytes)
        port = free_port()
        joined = start_receivers(self.host, port)
        self.group = RefitGroup.create(self.host, port, 0, self.world, self.backend, self.timeout_s)
        self.group.publish(LAYOUT, (self.manifest, self.plan))
        ray.get(joined)

    def send(self, module: torch.nn.Module, version: int, receiving, stopping: Callable[[], bool]
             ) -> dict[str, float]:
        """Broadcast `module`'s weights as `version` once every receiver is inside the receive that
        `receiving` (its Ray reference) runs; returns refit/seconds, refit/gib, refit/buckets and
        async/refit_wait_s. Sends nothing and returns {} if `stopping()` turns true first (a
        preemption: the run ends after this step and the actor goes down with it)."""
        import ray

        start = time.perf_counter()
        try:
            poll = POLL_FIRST_S
            while not self.group.all_ready(version):
                if stopping():
                    return {}
                done, _ = ray.wait([receiving], timeout=poll)
                if done:  # the actor failed before it signalled: raise its error
                    ray.get(receiving)
                poll = min(2 * poll, POLL_MAX_S)
            waited = time.perf_counter() - start
            with torch.no_grad():
                sent = send_refit(self.group, self._stream(module), self.manifest, self.plan)
        except Exception:
            if stopping():  # the actor (or Ray) went down with the preemption signal: the run ends anyway
                return {}
            raise
        return sent | {"async/refit_wait_s": waited}

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


PASS, DONE = "pass", "done"


class StreamPeers:
    """The other ranks of global rank 0's model-parallel group (tensor x pipeline parallel) in a
    refit. The HF-named stream is a collective over that group (TP all-gathers, broadcasts between
    pipeline stages: weight_sync/source.py), so whenever rank 0 iterates it to send a refit, every
    peer iterates it too and drops what it gets. Rank 0 `announce`s each pass and `release`s the
    peers at the end of whatever may refit (always, also after an error or a refit a preemption
    cut short: a peer waits in `serve` until then); each peer `serve`s meanwhile."""

    def __init__(self, named: NamedTensors, group) -> None:
        self.named, self.group = named, group

    @classmethod
    def of_rank_0(cls, named: NamedTensors) -> "StreamPeers | None":
        """This rank's part if it is in global rank 0's model-parallel group of more than one rank."""
        from megatron.core import parallel_state

        group = parallel_state.get_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        return cls(named, group) if len(ranks) > 1 and 0 in ranks else None

    def _send(self, command: str) -> None:
        dist.broadcast_object_list([command], src=0, group=self.group)

    def announce(self) -> None:
        self._send(PASS)

    def release(self) -> None:
        self._send(DONE)

    def serve(self, module) -> int:
        """Iterate the stream once per pass rank 0 announces, until it releases; returns the passes."""
        passes = 0
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.group)
            if box[0] == DONE:
                return passes
            with torch.no_grad():
                for _ in self.named(module):
                    pass
            passes += 1

