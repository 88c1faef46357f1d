"""Asynchronous GRPO's rollout queue: version-tagged rollouts from the separate worker, staleness-bounded.

With `grpo.max_staleness = s`, when step k (0-based: the trainer's weights have had k optimizer
steps, policy version k) asks for its rollouts, the requests of steps k..k+s are queued at the
worker; the worker generates step k+1..k+s's while step k trains. The worker runs its calls in the
order sent (generation/rollout_worker.py), and the trainer refits it after every optimizer step, so
step j's request, sent at the start of step j-s after refit j-s, samples on version j-s: after the
first s steps every step trains on rollouts exactly s versions old (s = 0: the on-policy loop, the
request sent after the previous step's refit and waited for).

A rollout older than the bound (a refit that did not reach the worker: `trainer.
debug_skip_refit_steps` makes one on purpose) is dropped and counted; the worker is refitted with
the current weights and the same rows regenerate with the same seeds.

Rows: step j's prompts are the prompt sampler's batch j, drawn from a copy of the sampler, so the
run's own sampler (the one checkpoints save) advances only with the trained steps.

Several ranks: the queue runs on every rank, the worker's client on global rank 0 only. Each
step, every rank sends rank 0 its data-parallel rank, rows and sampling seeds for steps k..k+s
(all_gather_object); rank 0 queues one generate per data-parallel rank and step (its rows and
seeds, so every batch is the one the colocated engine would sample there; the ranks of one
tensor/pipeline-parallel group share it), waits for step k's and hands each rank its own
(scatter_object_list), with its metrics. Rank 0 sends the refit; the other ranks of its
model-parallel group iterate the weight stream with it (its TP gathers and PP broadcasts are
collectives over that group: weight_sync/refit_sender.StreamPeers), the other data-parallel
replicas take no part. After a resume
the queue starts empty: the in-flight rollouts of the steps after the checkpoint regenerate, on the
resumed (newer) weights, so a resumed asynchronous run does not repeat the uninterrupted one's
samples bit for bit.

Preemption: Slurm signals every process of the task, the local Ray's daemons included, which then
shut down, and a Ray call that needs them can end the trainer's process (Ray's C++ client exits
when its object store is gone). So once a preemption signal has arrived (`stopping`), the queue
stops using Ray: the step's rollouts are generated on the trainer's own module (`local`, the
colocated engine: the current weights, staleness 0, `async/local_fallback` 1) and no refit is
sent; a worker lost while waiting for its rollouts after the signal falls back the same way. Left
open: a signal during a Ray call that reads the object store (a result too large to travel inline)
can still end the process with exit 1 (README, "Asynchronous GRPO"). A refit puts nothing there (a
broadcast over a process group of its own, generation/rollout_worker.py) and stops waiting for the
worker once the signal has come.

Metrics per step: async/policy_version and async/staleness of the rollouts trained,
async/staleness_<v> (their rows at staleness v: summed over steps, the run's staleness histogram),
async/dropped_rows (this step) and async/dropped_total, async/trainer_idle_s (the trainer waiting
for rollouts), async/refit_wait_s (the trainer waiting for the worker to take its refit),
async/generation_idle_s (the worker without work between its previous generate and this step's,
refits not counted), time/generate (the worker's generation time), refit/*.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from nemo_rlsr.data.sampler import PromptSampler
from nemo_rlsr.generation.interface import RolloutBatch, SamplingParams
from nemo_rlsr.generation.rollout_worker import RolloutWorker
from nemo_rlsr.generation.sampling import request_seeds
from nemo_rlsr.weight_sync.refit_sender import StreamPeers

LOCAL = "local"  # rank 0's answer when every rank generates on its own module (a preemption)


@dataclass
class _Request:
    rows: list[int]
    seed: int
    ref: object


class AsyncRollouts:
    """`worker`: the rollout worker's client on global rank 0, None on every other rank."""

    def __init__(self, worker: RolloutWorker | None, prompt_ids: list[list[int]], params: SamplingParams,
                 max_staleness: int, total_steps: int, seed_of: Callable[[int], int],
                 stopping: Callable[[], bool], local: Callable[[list[int], int], RolloutBatch], dp_rank: int,
                 peers: StreamPeers | None = None) -> None:
        self.worker, self.prompt_ids, self.params = worker, prompt_ids, params
        self.max_staleness, self.total_steps, self.seed_of = max_staleness, total_steps, seed_of
        self.stopping, self.local, self.dp_rank, self.peers = stopping, local, dp_rank, peers
        if worker is not None and peers is not None:  # every pass over the stream, peers included
            worker.sender.before_pass = peers.announce
        self.pending: dict[tuple[int, int], _Request] = {}  # (step, data-parallel rank) -> its queued generate
        self.refitted: int | None = None  # the newest version sent to the worker
        self.dropped_total = 0

    def refit(self, module, version: int) -> dict[str, float]:
        """Send the trainer's weights of `version` (after each optimizer step, and before the first);
        nothing once a preemption signal has come (the run stops after this step). Every rank calls
        it: off rank 0 it returns {} at once, except on rank 0's model-parallel peers, which take
        part in the stream until rank 0 releases them."""
        if self.worker is None:
            if self.peers is not None:
                self.peers.serve(module)
            return {}
        try:
            return self._send_refit(module, version)
        finally:
            if self.peers is not None:
                self.peers.release()

    def _send_refit(self, module, version: int) -> dict[str, float]:
        if self.stopping():
            return {}
        metrics = self.worker.refit(module, version, self.stopping)
        if metrics:  # empty: a preemption signal came while waiting for the worker, nothing was sent
            self.refitted = version
        return metrics

    def _refit_now(self, module, version: int) -> dict[str, float]:
        """Rank 0, inside `take`: a refit the next generate needs. If a preemption stopped it, raise:
        `take` then has every rank generate locally (a generate queued behind the refit the worker
        is still waiting for would wait out the group's timeout)."""
        metrics = self._send_refit(module, version)
        if self.refitted != version:
            raise RuntimeError(f"the refit of version {version} was not sent (preemption signal)")
        return metrics

    def _submit(self, rows: list[int], seed: int) -> _Request:
        ref = self.worker.submit([self.prompt_ids[i] for i in rows], self.params, request_seeds(seed, len(rows)))
        return _Request(rows, seed, ref)

    def take(self, step: int, rows: list[int], sampler: PromptSampler, module) -> tuple[RolloutBatch, dict]:
        """Step `step`'s rollouts for `rows` (the batch `sampler` just gave, sampler positioned after
        it), generated by a policy at most max_staleness versions older than `step`; queues the
        requests of the next max_staleness steps first. A collective over all ranks."""
        start = time.perf_counter()
        ahead = copy.deepcopy(sampler)
        upcoming = {step: rows} | {j: ahead.next_batch()
                                   for j in range(step + 1, min(step + self.max_staleness, self.total_steps - 1) + 1)}
        mine = (self.stopping(), self.dp_rank, {j: (r, self.seed_of(j)) for j, r in upcoming.items()})
        everyone = _all_gather(mine)
        if any(stop for stop, _, _ in everyone):
            return self._local(step, rows)
        answers: list = [None] * len(everyone)
        if self.worker is not None:
            try:
                try:
                    answers = self._serve(step, [(dp, requests) for _, dp, requests in everyone], module)
                finally:
                    if self.peers is not None:
                        self.peers.release()
            except Exception as error:
                if not self.stopping():
                    _scatter([error] * len(everyone))  # every rank raises, none waits for the others
                    raise
                answers = [LOCAL] * len(everyone)  # the worker went down with the preemption signal
        elif self.peers is not None:  # a refit inside _serve streams over rank 0's model-parallel group
            self.peers.serve(module)
        answer = _scatter(answers)
        if isinstance(answer, Exception):
            raise RuntimeError(f"step {step + 1}: the rollout worker failed on rank 0: {answer!r}") from answer
        if answer == LOCAL:
            return self._local(step, rows)
        batch, metrics = answer
        return batch, metrics | {"async/trainer_idle_s": time.perf_counter() - start}

    def _serve(self, step: int, requests: list[tuple[int, dict]], module) -> list[tuple[RolloutBatch, dict]]:
        """Rank 0: queue the requests not queued yet, one generate per data-parallel rank and step (the
        ranks of a model-parallel group ask for the same rows), then every rank's rollouts of `step`
        (`requests[r]`: rank r's (data-parallel rank, {step: (rows, seed)}))."""
        wanted: dict[int, dict] = {}
        for rank, (dp, asked) in enumerate(requests):
            if wanted.setdefault(dp, asked) != asked:
                raise RuntimeError(f"step {step + 1}: rank {rank} asks for other rollouts than another rank of "
                                   f"data-parallel rank {dp}: {asked} vs {wanted[dp]}")
        metrics: dict[str, float] = {}
        if self.refitted is None:  # a fresh or resumed run: the worker has no weights yet
            metrics.update(self._refit_now(module, step))
        for dp, asked in sorted(wanted.items()):
            for j, (rows, seed) in sorted(asked.items()):
                if (j, dp) not in self.pending:
                    self.pending[(j, dp)] = self._submit(rows, seed)
        results = {dp: self._result(step, dp, asked[step][0], module, dict(metrics))
                   for dp, asked in sorted(wanted.items())}
        return [results[dp] for dp, _ in requests]

    def _result(self, step: int, dp: int, rows: list[int], module, metrics: dict) -> tuple[RolloutBatch, dict]:
        request = self.pending.pop((step, dp))
        if request.rows != rows:
            raise RuntimeError(f"step {step + 1}, data-parallel rank {dp}: queued rollouts are for prompt rows {request.rows}, "
                               f"the sampler gave {rows} (the prompt sampler moved outside the rollout queue)")
        generated = self.worker.result(request.ref)
        dropped = 0
        if step - generated.version > self.max_staleness:
            dropped = len(generated.batch.response_ids)
            self.dropped_total += dropped
            if self.refitted != step:
                metrics.update(self._refit_now(module, step))
            generated = self.worker.result(self._submit(rows, request.seed).ref)
        staleness = step - generated.version
        metrics.update({
            "async/policy_version": generated.version, "async/staleness": staleness,
            "async/dropped_rows": dropped, "async/dropped_total": self.dropped_total,
            "async/generation_idle_s": generated.idle_s, "time/generate": generated.generate_s,
        })
        return generated.batch, metrics | self._histogram(generated.batch, staleness)

    def _histogram(self, batch: RolloutBatch, staleness: int) -> dict[str, int]:
        return {f"async/staleness_{v}": len(batch.response_ids) * (v == staleness)
                for v in range(self.max_staleness + 1)}

    def _local(self, step: int, rows: list[int]) -> tuple[RolloutBatch, dict]:
        start = time.perf_counter()
        batch = self.local(rows, self.seed_of(step))
        return batch, {"async/policy_version": step, "async/staleness": 0, "async/local_fallback": 1,
                       "time/generate": time.perf_counter() - start} | self._histogram(batch, 0)

    def close(self) -> None:
        self.pending.clear()
        if self.worker is not None:
            self.worker.close()


def _all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _scatter(objs: list):
    """Rank 0's `objs[r]` on rank r."""
    out = [None]
    dist.scatter_object_list(out, objs if dist.get_rank() == 0 else None, src=0)
    return out[0]
