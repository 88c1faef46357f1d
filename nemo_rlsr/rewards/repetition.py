"""Repetition penalty for RLSR rewards.

The paper sets the reward to -1 when a "longest common substring" measure exceeds
100 characters AND 10% of the reference length. It does not say between which
strings, so three modes are offered:

* ``self`` (default): the longest substring that occurs twice inside the response.
  This is a loop detector: degenerate policies that repeat a phrase get -1 instead of
  the (often decent) cosine similarity of their first, non-looping part.
* ``reference``: longest common substring of response and reference (copying).
* ``prompt``: longest common substring of response and prompt (echoing the prompt).

The decision needs only a threshold test -- "does some substring of length T+1 occur
twice?" -- answered from the polynomial hashes of all windows of length T+1, in linear
time. Why this shape: a rolling hash advanced one character at a time in a Python loop
is slow (milliseconds per 4k characters), a set of substring slices costs O(n*T), and a
Python set of n hash ints is itself slower than the numpy work. Here every window hash
comes from prefix sums in a handful of numpy passes, and equal hashes are brought
together by a two-pass 16-bit radix sort (numpy counting sorts): O(n), no Python loop
per character. Candidates are verified with a real string compare, so answers are
exact: no false positives, and all windows sharing a hash are compared with each
other, so no false negatives (benchmarks/repetition_bench.py measures the alternatives).
Exact lengths (for logging a sample of responses) binary-search over the threshold
test, reusing the prefix sums: O(n log n).

No torch, so it can run in reward workers and process pools without an accelerator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nemo_rlsr.config.rules import penalty_problems

__all__ = [
    "has_repeat_longer_than",
    "longest_repeated_substring_length",
    "has_common_substring_longer_than",
    "longest_common_substring_length",
    "RepetitionPenalty",
]

# Two primes below 2^31: residues multiply inside int64 without overflow, and the pair
# is a ~62-bit hash (collisions between unequal windows ~ n^2 / 2^62 per text).
_PRIMES = (2_147_483_647, 2_147_483_629)
_BASE = 1_000_003


_POWERS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _power_table(base: int, p: int, size: int) -> np.ndarray:
    """[base^0, ..., base^(size-1)] mod p, by doubling (log2(size) numpy passes)."""
    table = np.ones(1, dtype=np.int64)
    while len(table) < size:
        table = np.concatenate([table, table * pow(base, len(table), p) % p])
    return table[:size]


def _powers(p: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached tables of B^i and B^-i mod p with at least ``size`` entries."""
    have = _POWERS.get((p, _BASE))
    if have is None or len(have[0]) < size:
        size = max(size, 4096, 2 * len(have[0]) if have else 0)
        base = _BASE % p
        have = (_power_table(base, p, size), _power_table(pow(base, -1, p), p, size))
        _POWERS[(p, _BASE)] = have
    return have


class _WindowHasher:
    """Hashes of every length-L window of one text, for any L, from per-prime prefix sums.

    With S[k] = sum_{j<k} c_j B^-j, the window [i, i+L) hashes to
    (S[i+L] - S[i]) * B^(i+L-1) = sum_j c_j B^(i+L-1-j) mod p: the usual polynomial hash,
    independent of where the window sits. The prefix sums are computed once per text.
    """

    def __init__(self, text: str) -> None:
        self.n = len(text)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        self._prefix = []
        for p in _PRIMES:
            pw, inv = _powers(p, self.n + 1)
            prefix = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(codes % p * inv[: self.n] % p, out=prefix[1:])  # < n * 2^31: no overflow
            self._prefix.append((p, pw, prefix))

    def windows(self, length: int) -> np.ndarray:
        """int64 hash of text[i:i+length] for i in 0..n-length (empty if length > n)."""
        count = self.n - length + 1
        if length < 1 or count < 1:
            return np.zeros(0, dtype=np.int64)
        combined = np.zeros(count, dtype=np.int64)
        for p, pw, prefix in self._prefix:
            h = (prefix[length:] - prefix[:count]) % p * pw[length - 1 : length - 1 + count] % p
            combined = combined * p + h  # < 2^62 for two 31-bit primes
        return combined


def _check_threshold(threshold: int) -> None:
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")


def _equal_key_runs(hashes: np.ndarray):
    """Yield the index arrays of runs of >= 2 hashes with equal low 32 bits, in O(n).

    Two stable passes over 16-bit digits (numpy sorts 16-bit keys with a radix/counting
    sort, not a comparison sort) make equal keys adjacent. Equal hashes share their low 32
    bits, so every repeated window is in some run; a run may also hold unequal windows
    (a 32-bit collision, ~n^2 / 2^33 pairs per text), which the callers' string compares
    reject."""
    if len(hashes) < 2:
        return
    order = np.argsort((hashes & 0xFFFF).astype(np.uint16), kind="stable")
    order = order[np.argsort((hashes[order] >> 16 & 0xFFFF).astype(np.uint16), kind="stable")]
    keys = hashes[order] & 0xFFFFFFFF
    same = np.concatenate(([False], keys[1:] == keys[:-1], [False]))
    edges = np.flatnonzero(same[1:] != same[:-1])  # (first, last) pairs of each run of `same`
    for first, last in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        yield order[first : last + 1]


def _repeats(text: str, hasher: _WindowHasher, length: int) -> bool:
    for run in _equal_key_runs(hasher.windows(length)):
        seen = set()
        for start in run.tolist():
            window = text[start : start + length]
            if window in seen:
                return True
            seen.add(window)
    return False


def _shares(a: str, ha: _WindowHasher, b: str, hb: _WindowHasher, length: int) -> bool:
    hashes_a = ha.windows(length)
    offset = len(hashes_a)  # indices >= offset in the concatenation are windows of b
    for run in _equal_key_runs(np.concatenate([hashes_a, hb.windows(length)])):
        starts = run.tolist()
        in_a = {a[s : s + length] for s in starts if s < offset}
        if in_a and any(b[s - offset : s - offset + length] in in_a for s in starts if s >= offset):
            return True
    return False


def has_repeat_longer_than(text: str, threshold: int) -> bool:
    """True iff some substring of length ``threshold + 1`` occurs at least twice in
    ``text`` (occurrences may overlap: "aaa" repeats "aa")."""
    _check_threshold(threshold)
    if threshold + 2 > len(text):  # fewer than two windows
        return False
    return _repeats(text, _WindowHasher(text), threshold + 1)


def has_common_substring_longer_than(a: str, b: str, threshold: int) -> bool:
    """True iff ``a`` and ``b`` share a substring of length ``threshold + 1``."""
    _check_threshold(threshold)
    if threshold + 1 > min(len(a), len(b)):
        return False
    return _shares(a, _WindowHasher(a), b, _WindowHasher(b), threshold + 1)


def _max_length(upper: int, exists) -> int:
    """Largest L in [0, upper] with exists(L) (exists(0) is taken as true, and the
    property is monotone: a shared/repeated L-substring implies an (L-1)-one)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if exists(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def longest_repeated_substring_length(text: str) -> int:
    """Length of the longest substring occurring at least twice in ``text`` (overlap allowed)."""
    hasher = _WindowHasher(text)
    return _max_length(max(len(text) - 1, 0), lambda L: _repeats(text, hasher, L))


def longest_common_substring_length(a: str, b: str) -> int:
    """Length of the longest common substring of ``a`` and ``b``."""
    ha, hb = _WindowHasher(a), _WindowHasher(b)
    return _max_length(min(len(a), len(b)), lambda L: _shares(a, ha, b, hb, L))


@dataclass(frozen=True)
class RepetitionPenalty:
    """The paper's rule: reward := ``penalty`` (-1) when the measured substring length
    exceeds BOTH ``min_chars`` (100) AND ``min_reference_fraction`` (10%) of the
    reference length. Scaling with the reference keeps long legitimate answers (which
    naturally repeat boilerplate or, in ``reference`` mode, quote the reference) from
    being punished; the absolute floor keeps short references from making the rule
    hair-trigger.
    """

    mode: str = "self"
    min_chars: int = 100
    min_reference_fraction: float = 0.1
    penalty: float = -1.0

    def __post_init__(self) -> None:
        problems = penalty_problems(self.mode, self.min_chars, self.min_reference_fraction, self.penalty)
        if problems:
            raise ValueError("; ".join(problems))

    def threshold(self, reference: str) -> int:
        """Largest length that is NOT penalized: a length L is penalized iff L > this.
        (For integer L, ``L > f*len`` is the same as ``L > floor(f*len)``.)"""
        return max(self.min_chars, math.floor(self.min_reference_fraction * len(reference)))

    def measure(self, response: str, reference: str, prompt: str = "") -> int:
        """Exact measured length (O(n log n)); for logging. ``is_penalized`` is cheaper."""
        if self.mode == "self":
            return longest_repeated_substring_length(response)
        other = reference if self.mode == "reference" else prompt
        return longest_common_substring_length(response, other)

    def is_penalized(self, response: str, reference: str, prompt: str = "") -> bool:
        """One linear pass: does the measure exceed ``threshold(reference)``?"""
        t = self.threshold(reference)
        if self.mode == "self":
            return has_repeat_longer_than(response, t)
        other = reference if self.mode == "reference" else prompt
        return has_common_substring_longer_than(response, other, t)
