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

    def _stream(self, module: torch.nn.Module):
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
