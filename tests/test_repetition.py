"""Property tests of the rolling-hash substring tests against brute force."""

from __future__ import annotations

import random

import pytest

from nemo_rlsr.rewards.repetition import (
    RepetitionPenalty,
    has_common_substring_longer_than,
    has_repeat_longer_than,
    longest_common_substring_length,
    longest_repeated_substring_length,
)


# ---- brute-force references -------------------------------------------------
def brute_has_repeat(text: str, k: int) -> bool:
    """Some substring of length k occurs twice (overlap allowed)."""
    seen = set()
    for i in range(len(text) - k + 1):
        s = text[i : i + k]
        if s in seen:
            return True
        seen.add(s)
    return False


def brute_longest_repeat(text: str) -> int:
    n = len(text)
    best = 0
    for i in range(n):
        for j in range(i + 1, n):
            L = 0
            while j + L < n and text[i + L] == text[j + L]:
                L += 1
            best = max(best, L)
    return best


def brute_has_common(a: str, b: str, k: int) -> bool:
    sa = {a[i : i + k] for i in range(len(a) - k + 1)}
    return any(b[j : j + k] in sa for j in range(len(b) - k + 1))


def brute_longest_common(a: str, b: str) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            L = 0
            while i + L < len(a) and j + L < len(b) and a[i + L] == b[j + L]:
                L += 1
            best = max(best, L)
    return best


ALPHABETS = ["a", "ab", "abc", "abcdefghij", "é漢😀", "aé漢😀\n "]


def random_cases(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        alpha = rng.choice(ALPHABETS)
        yield "".join(rng.choice(alpha) for _ in range(rng.randint(0, 60))), alpha, rng


ADVERSARIAL = [
    "",
    "a",
    "aa",
    "a" * 50,
    "abc" * 7,
    "abcd" * 10 + "x",
    "ab" * 20 + "ba",
    "😀" * 9,
    "é漢😀" * 5,
    "xyz0123456789abcdefghijKLM0123456789abcdefghijQ",  # planted repeat of 20 chars
    "abcdefghijklmnopqrstuvwxyz",  # no repeats at all
]


# ---- self-repetition ----------------------------------------------------------
def test_self_random_against_brute_force():
    checked = 0
    for text, _, rng in random_cases(seed=1234, count=3000):
        expected_len = brute_longest_repeat(text)
        assert longest_repeated_substring_length(text) == expected_len, text
        for t in (rng.randint(0, 20), max(expected_len - 1, 0), expected_len):
            got = has_repeat_longer_than(text, t)
            assert got == brute_has_repeat(text, t + 1), (text, t)
            assert got == (expected_len > t), (text, t)
            checked += 1
    assert checked == 9000


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_self_adversarial(text: str):
    expected = brute_longest_repeat(text)
    assert longest_repeated_substring_length(text) == expected
    for t in range(0, 25):
        assert has_repeat_longer_than(text, t) == brute_has_repeat(text, t + 1), t


def test_self_known_values():
    assert longest_repeated_substring_length("") == 0
    assert longest_repeated_substring_length("a" * 50) == 49  # overlapping occurrences count
    assert longest_repeated_substring_length("abc" * 7) == 18
    assert longest_repeated_substring_length("abcdefghijklmnopqrstuvwxyz") == 0
    assert not has_repeat_longer_than("", 0)
    assert has_repeat_longer_than("aa", 0) and not has_repeat_longer_than("aa", 1)


def test_self_boundary_exact_threshold():
    # A planted repeat of exactly T chars is NOT "longer than T"; T+1 chars is.
    rng = random.Random(7)
    for T in (1, 5, 20, 100):
        # distinct filler characters so the only repeat is the planted one
        pool = [chr(0x4E00 + i) for i in range(4 * T + 20)]
        rng.shuffle(pool)
        unit_T, unit_T1 = "".join(pool[:T]), "".join(pool[T : 2 * T + 1])
        fill = pool[2 * T + 1 :]
        text_T = fill[0] + unit_T + fill[1] + unit_T + fill[2]
        text_T1 = fill[3] + unit_T1 + fill[4] + unit_T1 + fill[5]
        assert not has_repeat_longer_than(text_T, T)
        assert has_repeat_longer_than(text_T, T - 1)
        assert has_repeat_longer_than(text_T1, T)
        assert not has_repeat_longer_than(text_T1, T + 1)
        assert longest_repeated_substring_length(text_T) == T
        assert longest_repeated_substring_length(text_T1) == T + 1


def test_negative_threshold_rejected():
    with pytest.raises(ValueError):
        has_repeat_longer_than("abc", -1)
    with pytest.raises(ValueError):
        has_common_substring_longer_than("abc", "abc", -1)


def test_long_input_is_fast_enough():
    rng = random.Random(3)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(20_000))
    assert not has_repeat_longer_than(text, 100)
    assert has_repeat_longer_than(text + text[500:700], 100)


# ---- common substring -----------------------------------------------------------
def test_common_random_against_brute_force():
    rng = random.Random(99)
    for _ in range(2000):
        alpha = rng.choice(ALPHABETS)
        a = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 40)))
        expected = brute_longest_common(a, b)
        assert longest_common_substring_length(a, b) == expected, (a, b)
        assert longest_common_substring_length(b, a) == expected, (a, b)
        for t in (rng.randint(0, 20), max(expected - 1, 0), expected):
            got = has_common_substring_longer_than(a, b, t)
            assert got == brute_has_common(a, b, t + 1), (a, b, t)
            assert got == (expected > t)


@pytest.mark.parametrize("a", ADVERSARIAL)
@pytest.mark.parametrize("b", ["", "a", "abcabc", "a" * 30, "é漢😀é漢", "0123456789abcdefghij"])
def test_common_adversarial(a: str, b: str):
    expected = brute_longest_common(a, b)
    assert longest_common_substring_length(a, b) == expected
    for t in range(0, 25):
        assert has_common_substring_longer_than(a, b, t) == brute_has_common(a, b, t + 1)


def test_common_known_values():
    assert longest_common_substring_length("", "abc") == 0
    assert longest_common_substring_length("xxhello worldyy", "zhello worz") == 9
    assert longest_common_substring_length("abc", "abc") == 3
    assert not has_common_substring_longer_than("abc", "abc", 3)
    assert has_common_substring_longer_than("abc", "abc", 2)


# ---- RepetitionPenalty -----------------------------------------------------------
LOOP = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmn"  # 50 distinct chars


def _response_with_loop(repeat_len: int) -> str:
    """A looping response whose longest repeated substring is exactly ``repeat_len``
    (a periodic string of period 50 and length L has longest repeat L - 50)."""
    assert len(set(LOOP)) == len(LOOP) == 50
    return "#" + (LOOP * 10)[: repeat_len + 50] + "!"


def test_penalty_default_threshold_and_reference_scaling():
    rp = RepetitionPenalty()
    response = _response_with_loop(120)
    assert longest_repeated_substring_length(response) == 120
    short_ref = "A short human reference answer." * 10  # 310 chars: 10% = 31 < 100
    long_ref = "x" * 2000  # 10% = 200 > 120
    assert rp.threshold(short_ref) == 100
    assert rp.threshold(long_ref) == 200
    assert rp.is_penalized(response, short_ref, "prompt")
    assert not rp.is_penalized(response, long_ref, "prompt")
    assert rp.measure(response, short_ref) == 120


def test_penalty_boundary_exactly_min_chars():
    rp = RepetitionPenalty()
    assert longest_repeated_substring_length(_response_with_loop(100)) == 100
    assert not rp.is_penalized(_response_with_loop(100), "ref", "")
    assert rp.is_penalized(_response_with_loop(101), "ref", "")
    # fraction side: reference of 1500 chars => threshold 150
    ref = "r" * 1500
    assert not rp.is_penalized(_response_with_loop(150), ref, "")
    assert rp.is_penalized(_response_with_loop(151), ref, "")


def test_penalty_fractional_reference_threshold():
    # 10% of 1505 chars = 150.5: a 151-char loop exceeds it, a 150-char one does not.
    rp = RepetitionPenalty()
    ref = "r" * 1505
    assert rp.threshold(ref) == 150
    assert rp.is_penalized(_response_with_loop(151), ref, "")
    assert not rp.is_penalized(_response_with_loop(150), ref, "")


def test_penalty_reference_and_prompt_modes():
    rng = random.Random(5)
    shared = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(150))
    response = "My answer copies. " + shared + " done."
    copied = "Reference: " + shared + " end."  # shares 150+ chars with the response
    other = "What is two plus two? Answer briefly."  # shares almost nothing
    ref_mode, prompt_mode, self_mode = (RepetitionPenalty(mode=m) for m in ("reference", "prompt", "self"))
    # reference mode looks only at the reference
    assert ref_mode.is_penalized(response, copied, other)
    assert not ref_mode.is_penalized(response, other, copied)
    assert ref_mode.measure(response, copied, other) >= 150
    # prompt mode looks only at the prompt (the reference only sets the threshold)
    assert prompt_mode.is_penalized(response, other, copied)
    assert not prompt_mode.is_penalized(response, copied, other)
    # self mode: the response has no internal loop
    assert not self_mode.is_penalized(response, copied, copied)
    # a 90-char overlap is below the 100-char floor
    assert not ref_mode.is_penalized(shared[:90], copied, other)


def test_hash_collisions_are_verified(monkeypatch):
    """With a tiny modulus almost every window collides; answers must stay exact,
    which exercises the string-compare verification and the collision buckets."""
    import nemo_rlsr.rewards.repetition as rep

    monkeypatch.setattr(rep, "_PRIMES", (7, 5))  # 35 hash values in all
    rng = random.Random(11)
    for _ in range(400):
        alpha = rng.choice(ALPHABETS[1:])
        a = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 30)))
        assert rep.longest_repeated_substring_length(a) == brute_longest_repeat(a), a
        assert rep.longest_common_substring_length(a, b) == brute_longest_common(a, b), (a, b)
    assert not rep.has_repeat_longer_than("abcdefghijklmnopqrstuvwxyz", 0)


def test_invalid_mode_raises():
    with pytest.raises(ValueError, match="self.*reference.*prompt"):
        RepetitionPenalty(mode="loops")
