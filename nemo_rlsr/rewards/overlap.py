"""Scoring overlapped with generation: a step's chunks are scored in one background thread while
the next chunk generates (``reward.overlap_chunks``).

Why one thread and not the actors' own asynchrony: every backend then overlaps the same way. The
in-process encoder (``local``) and the HTTP client (``openai``) spend their time in torch kernels and
socket reads, both of which release the GIL, so the generating main thread keeps running; the Ray
pool's ``score`` is a ``ray.get`` that waits in the thread. Jobs run one after another in submission
order, so a chunk's result never depends on how the chunks' scoring interleaved.

Failure: ``join`` returns every chunk's result concatenated in order, or raises the first chunk's
error after every submitted job has ended (those not started are cancelled), so no step trains on
a partial batch and no scoring outlives the step. ``OverlappedScoring`` is a context manager: leaving
it (normally, or on an error in generation) waits for the thread and shuts it down.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

from .actor import RewardActor
from .result import RewardResult

__all__ = ["OverlappedScoring", "chunk_bounds"]


def chunk_bounds(prompts: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) prompt ranges of `chunks` contiguous chunks of about equal size (the first ones
    one larger), at most one per prompt; one empty range for no prompts."""
    chunks = max(1, min(chunks, prompts))
    size, extra = divmod(prompts, chunks)
    bounds, start = [], 0
    for k in range(chunks):
        stop = start + size + (k < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


class OverlappedScoring:
    """Submits scoring jobs to one background thread and joins them in order, timing each job."""

    def __init__(self, reward: RewardActor, background: bool = True) -> None:
        """`background=False` (one chunk: nothing to overlap) scores in the calling thread at submit."""
        self.reward = reward
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nemo_rlsr_scoring") if background else None
        self._jobs: list[Future] = []
        self.intervals: list[tuple[float, float]] = []  # (start, end) perf_counter of each finished job

    def __enter__(self) -> "OverlappedScoring":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _score(self, prompts: list[str], responses: list[str], references: list[str]) -> RewardResult:
        start = time.perf_counter()
        try:
            return self.reward.score(prompts, responses, references).check(prompts)
        finally:
            self.intervals.append((start, time.perf_counter()))

    def submit(self, prompts: list[str], responses: list[str], references: list[str]) -> None:
        """Queue one chunk's scoring and return at once (or score it now, without a thread)."""
        if self._pool is not None:
            self._jobs.append(self._pool.submit(self._score, list(prompts), list(responses), list(references)))
            return
        job: Future = Future()
        try:
            job.set_result(self._score(list(prompts), list(responses), list(references)))
        except Exception as exc:  # raised by join, like a background job's
            job.set_exception(exc)
        self._jobs.append(job)

    def join(self) -> RewardResult:
        """Every submitted chunk's result, concatenated in submission order; otherwise the first
        failed chunk's error, raised once the other jobs are cancelled or have ended."""
        parts = []
        for k, job in enumerate(self._jobs):
            try:
                parts.append(job.result())
            except BaseException:
                rest = self._jobs[k + 1:]
                for later in rest:
                    later.cancel()  # the not-yet-started ones; a running one finishes
                wait(rest)
                raise
        return RewardResult.cat(parts)

    def hidden_seconds(self, until: float) -> float:
        """Scoring time spent before `until` (the end of generation): the part generation hid."""
        return sum(max(0.0, min(end, until) - start) for start, end in self.intervals if start < until)

    def close(self) -> None:
        """Cancel what has not started, wait for what runs, and end the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
