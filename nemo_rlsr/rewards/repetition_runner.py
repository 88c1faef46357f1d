"""Runs the repetition penalty over a batch off the calling thread.

Why: the penalty is CPU work (numpy and string compares) and the encoder is accelerator
work (or torch kernels that release the GIL): started first, the checks overlap the
embedding. With ``workers > 0`` they also spread over a process pool, for reward actors
that own many CPU cores; benchmarks/repetition_bench.py measures when that pays off.
The first ``measure_first`` responses also get their exact measure, for logging: the
threshold test says only "over or not", and the exact lengths show how close a policy
runs to the threshold.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

from .repetition import RepetitionPenalty

__all__ = ["RepetitionRunner"]

Item = tuple[str, str, str]  # (prompt, response, reference)


def _check(penalty: RepetitionPenalty, items: list[Item], measure: int) -> tuple[list[bool], list[int]]:
    penalized = [penalty.is_penalized(r, ref, p) for p, r, ref in items]
    lengths = [penalty.measure(r, ref, p) if k < measure else -1 for k, (p, r, ref) in enumerate(items)]
    return penalized, lengths


class RepetitionRunner:
    """``submit(...)`` returns a Future of (penalized flags, exact lengths or -1)."""

    def __init__(self, penalty: RepetitionPenalty, workers: int = 0, measure_first: int = 8) -> None:
        if workers < 0 or measure_first < 0:
            raise ValueError(f"workers and measure_first must be >= 0, got {workers}, {measure_first}")
        self.penalty = penalty
        self.measure_first = measure_first
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="repetition")
        # forkserver: workers start from a clean process, not a fork of one holding torch threads.
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
                      if workers else None)
        self._workers = workers

    def submit(self, prompts: list[str], responses: list[str], references: list[str]) -> Future:
        return self._thread.submit(self._run, list(zip(prompts, responses, references)))

    def _run(self, items: list[Item]) -> tuple[list[bool], list[int]]:
        if self._pool is None or len(items) < 2:
            return _check(self.penalty, items, self.measure_first)
        size = -(-len(items) // (4 * self._workers))  # a few chunks per worker, for balance
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        measures = [max(0, min(len(c), self.measure_first - i)) for c, i in zip(chunks, range(0, len(items), size))]
        penalized: list[bool] = []
        lengths: list[int] = []
        for flags, lens in self._pool.map(_check, [self.penalty] * len(chunks), chunks, measures):
            penalized += flags
            lengths += lens
        return penalized, lengths

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
