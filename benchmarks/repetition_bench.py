"""Repetition penalty: our threshold test against the alternatives, and batch throughput.

    python benchmarks/repetition_bench.py [--chars 4000] [--batch 256]

1. One 4k-character response (and a 4k-character reference), threshold 100 characters:
   our linear-time test (self and reference modes), our exact measure, and the baselines:
   the O(n*m) longest-common-substring dynamic programme (pure Python, and numpy row by row),
   a pure-Python rolling hash advanced one character at a time (this project's previous
   implementation), and a set of substring slices (O(n*T)).
2. A step's worth of responses with the realistic length mix (benchmarks/texts.py, up to
   ~16k characters): responses/s checked inline vs in a process pool (RepetitionRunner).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from texts import random_text, rollouts, vocabulary  # noqa: E402

from nemo_rlsr.rewards.repetition import (  # noqa: E402
    RepetitionPenalty,
    has_common_substring_longer_than,
    has_repeat_longer_than,
    longest_common_substring_length,
    longest_repeated_substring_length,
)
from nemo_rlsr.rewards.repetition_runner import RepetitionRunner  # noqa: E402


# ---- baselines --------------------------------------------------------------------------------
def dp_longest_common(a: str, b: str) -> int:
    """The textbook O(n*m) dynamic programme, pure Python."""
    best, prev = 0, [0] * (len(b) + 1)
    for ch in a:
        cur = [0] * (len(b) + 1)
        for j, other in enumerate(b, 1):
            if ch == other:
                cur[j] = prev[j - 1] + 1
                if cur[j] > best:
                    best = cur[j]
        prev = cur
    return best


def dp_longest_common_numpy(a: str, b: str) -> int:
    """The same O(n*m) programme with each row vectorized (n numpy passes of length m)."""
    bb = np.frombuffer(b.encode("utf-32-le"), dtype="<u4")
    prev, best = np.zeros(len(b) + 1, dtype=np.int32), 0
    for ch in a:
        cur = np.zeros_like(prev)
        cur[1:] = np.where(bb == ord(ch), prev[:-1] + 1, 0)
        best = max(best, int(cur.max()))
        prev = cur
    return best


def python_rolling_hash_repeat(text: str, threshold: int) -> bool:
    """A rolling hash advanced character by character in Python (the previous implementation)."""
    mod, base, length = (1 << 61) - 1, 1_000_003, threshold + 1
    if length > len(text):
        return False
    top, h = pow(base, length - 1, mod), 0
    for ch in text[:length]:
        h = (h * base + ord(ch)) % mod
    seen = {h: [0]}
    for start in range(1, len(text) - length + 1):
        h = ((h - ord(text[start - 1]) * top) * base + ord(text[start + length - 1])) % mod
        bucket = seen.setdefault(h, [])
        if any(text[p : p + length] == text[start : start + length] for p in bucket):
            return True
        bucket.append(start)
    return False


def slice_set_repeat(text: str, threshold: int) -> bool:
    """A set of substring slices: simple and C-fast per slice, but O(n*T) characters hashed."""
    length, seen = threshold + 1, set()
    for start in range(len(text) - length + 1):
        window = text[start : start + length]
        if window in seen:
            return True
        seen.add(window)
    return False


def timed(fn, *args, repeat: int = 5) -> float:
    """Best of ``repeat`` wall times in seconds (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def single_response(chars: int) -> None:
    rng, words = random.Random(1), vocabulary()
    response, reference = random_text(rng, words, chars)[:chars], random_text(rng, words, chars)[:chars]
    t = 100
    print(f"== repetition check, one {len(response)}-char response vs a {len(reference)}-char reference, "
          f"threshold {t} chars (best of several runs; DP once) ==")
    ours_self = timed(has_repeat_longer_than, response, t, repeat=20)
    ours_ref = timed(has_common_substring_longer_than, response, reference, t, repeat=20)
    exact_ref = timed(longest_common_substring_length, response, reference, repeat=3)
    exact_self = timed(longest_repeated_substring_length, response, repeat=3)
    t0 = time.perf_counter()
    dp = dp_longest_common(response, reference)
    dp_s = time.perf_counter() - t0
    dp_np = timed(dp_longest_common_numpy, response, reference, repeat=1)
    assert dp == longest_common_substring_length(response, reference) == dp_longest_common_numpy(response, reference)
    rolling = timed(python_rolling_hash_repeat, response, t, repeat=3)
    slices = timed(slice_set_repeat, response, t, repeat=5)
    rows = [
        ("ours: threshold test, self mode", ours_self),
        ("ours: threshold test, reference mode", ours_ref),
        ("ours: exact length, self (binary search)", exact_self),
        ("ours: exact length, reference (binary search)", exact_ref),
        ("O(n*m) DP, pure Python (exact, reference)", dp_s),
        ("O(n*m) DP, numpy rows (exact, reference)", dp_np),
        ("rolling hash in a Python loop (self)", rolling),
        ("set of substring slices (self)", slices),
    ]
    for name, sec in rows:
        print(f"  {name:48s} {sec * 1e3:10.3f} ms")
    print(f"  speedup of the threshold test (reference mode) over the pure-Python DP: {dp_s / ours_ref:,.0f}x; "
          f"over the numpy DP: {dp_np / ours_ref:,.0f}x")
    print(f"  speedup of the exact measure over the pure-Python DP: {dp_s / exact_ref:,.0f}x")
    print(f"  self mode: {rolling / ours_self:,.1f}x faster than the Python rolling hash, "
          f"{slices / ours_self:,.1f}x faster than the slice set")


def batch_throughput(count: int, workers: list[int]) -> None:
    prompts, responses, references = rollouts(count)
    chars = sum(map(len, responses))
    print(f"== repetition checks for {count} responses (mean {chars / count:,.0f} chars, "
          f"max {max(map(len, responses)):,}), self mode, threshold max(100, 10% of reference) ==")
    penalty = RepetitionPenalty()
    base = None
    for w in workers:
        runner = RepetitionRunner(penalty, workers=w, measure_first=0)
        runner.submit(prompts[:8], responses[:8], references[:8]).result()  # start the pool
        sec = timed(lambda: runner.submit(prompts, responses, references).result(), repeat=3)
        flags, _ = runner.submit(prompts, responses, references).result()
        runner.close()
        base = base or sec
        label = "inline (one thread)" if w == 0 else f"process pool, {w} workers"
        print(f"  {label:28s} {count / sec:10,.0f} responses/s   ({base / sec:.2f}x; {sum(flags)} penalized)")
    print(f"  (os.cpu_count() = {os.cpu_count()}; a pool pays off only with idle cores)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)
    single_response(args.chars)
    batch_throughput(args.batch, args.workers)


if __name__ == "__main__":
    main()
