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
twice?" -- which is one rolling-hash pass (linear expected time). Hash hits are
verified with a real string compare, so answers are exact (no false positives, and
colliding windows are kept in a bucket, so no false negatives either). Exact lengths
(for logging / tests) use binary search over that test: O(n log n).

Pure Python, no torch, so it can run in reward workers without an accelerator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "has_repeat_longer_than",
    "longest_repeated_substring_length",
    "has_common_substring_longer_than",
    "longest_common_substring_length",
    "RepetitionPenalty",
    "MODES",
]

_MOD = (1 << 61) - 1  # Mersenne prime: 61-bit hash, collisions ~ n^2 / 2^61.
_BASE = 1_000_003  # > max code point (0x10FFFF): windows of <= 3 chars never collide.

MODES = ("self", "reference", "prompt")


def _window_hashes(text: str, length: int):
    """Yield (start, hash) for every window text[start:start+length]; length >= 1."""
    n = len(text)
    if length > n:
        return
    top = pow(_BASE, length - 1, _MOD)  # weight of the character leaving the window
    h = 0
    for ch in text[:length]:
        h = (h * _BASE + ord(ch)) % _MOD
    yield 0, h
    for start in range(1, n - length + 1):
        h = ((h - ord(text[start - 1]) * top) * _BASE + ord(text[start + length - 1])) % _MOD
        yield start, h


def _check_threshold(threshold: int) -> None:
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")


def has_repeat_longer_than(text: str, threshold: int) -> bool:
    """True iff some substring of length ``threshold + 1`` occurs at least twice in
    ``text`` (occurrences may overlap: "aaa" repeats "aa")."""
    _check_threshold(threshold)
    length = threshold + 1
    seen: dict[int, list[int]] = {}
    for start, h in _window_hashes(text, length):
        bucket = seen.get(h)
        if bucket is None:
            seen[h] = [start]
            continue
        window = text[start : start + length]
        for prev in bucket:
            if text[prev : prev + length] == window:
                return True
        bucket.append(start)  # genuine hash collision: keep both, carry on
    return False


def has_common_substring_longer_than(a: str, b: str, threshold: int) -> bool:
    """True iff ``a`` and ``b`` share a substring of length ``threshold + 1``."""
    _check_threshold(threshold)
    length = threshold + 1
    if length > len(a) or length > len(b):
        return False
    if len(a) > len(b):  # index the shorter string
        a, b = b, a
    seen: dict[int, list[int]] = {}
    for start, h in _window_hashes(a, length):
        seen.setdefault(h, []).append(start)
    for start, h in _window_hashes(b, length):
        bucket = seen.get(h)
        if bucket is None:
            continue
        window = b[start : start + length]
        for prev in bucket:
            if a[prev : prev + length] == window:
                return True
    return False


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
    return _max_length(max(len(text) - 1, 0), lambda L: has_repeat_longer_than(text, L - 1))


def longest_common_substring_length(a: str, b: str) -> int:
    """Length of the longest common substring of ``a`` and ``b``."""
    return _max_length(min(len(a), len(b)), lambda L: has_common_substring_longer_than(a, b, L - 1))


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
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {self.min_chars}")
        if not (self.min_reference_fraction >= 0):
            raise ValueError(f"min_reference_fraction must be >= 0, got {self.min_reference_fraction}")

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
