"""Reward diagnostics, the range check, and the repetition runner (thread and process pool)."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rlsr.rewards import EmbeddingSimilarityReward, RepetitionPenalty, RewardRangeError, RewardResult
from nemo_rlsr.rewards.diagnostics import HIST_BINS, reward_diagnostics, topic_subject_flags
from nemo_rlsr.rewards.repetition import longest_repeated_substring_length
from nemo_rlsr.rewards.repetition_runner import RepetitionRunner

LOOP = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmn"  # 50 distinct chars


def _result(cosine, rewards=None, empty=None, cut=None, repeat=None) -> RewardResult:
    n = len(cosine)
    cosine = torch.tensor(cosine, dtype=torch.float32)
    false = torch.zeros(n, dtype=torch.bool)
    return RewardResult(
        rewards=cosine.clone() if rewards is None else torch.tensor(rewards, dtype=torch.float32),
        cosine=cosine, penalized=false, cut=false if cut is None else torch.tensor(cut), chunked=false,
        empty=false if empty is None else torch.tensor(empty),
        repeat_length=torch.full((n,), -1) if repeat is None else torch.tensor(repeat),
    )


def test_histogram_bins_and_counts():
    res = _result([-1.0, -0.95, -0.01, 0.0, 0.19, 0.2, 0.99, 1.0])
    m = reward_diagnostics(res, torch.arange(8.0))
    hist = [m[f"reward/cos_hist_{k}"] for k in range(HIST_BINS)]
    assert hist == [2, 0, 0, 0, 1, 2, 1, 0, 0, 2]  # [-1,-.8): 2; [-.2,0): 1; [0,.2): 2; [.2,.4): 1; [.8,1]: 2
    assert sum(hist) == 8


def test_empty_truncated_repeat_and_length_correlation():
    res = _result([0.1, 0.2, 0.3, 0.4], empty=[True, False, False, True], cut=[False, True, True, True],
                  repeat=[120, 30, -1, -1])
    m = reward_diagnostics(res, torch.tensor([10.0, 20.0, 30.0, 40.0]))
    assert m["reward/fraction_empty"] == 0.5
    assert m["reward/encoder_truncated"] == 3.0 and m["reward/encoder_chunked"] == 0.0
    assert m["reward/length_corr"] == pytest.approx(1.0)
    assert m["reward/repeat_len_mean"] == 75.0 and m["reward/repeat_len_max"] == 120.0
    anti = reward_diagnostics(res, torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert anti["reward/length_corr"] == pytest.approx(-1.0)
    constant = reward_diagnostics(res, torch.full((4,), 7.0))
    assert constant["reward/length_corr"] == 0.0  # no signal, not NaN
    single = reward_diagnostics(_result([0.5]), torch.tensor([3.0]))
    assert all(math.isfinite(v) for v in single.values())


def test_diagnostics_accept_gathered_floats():
    res = _result([0.1, 0.9], empty=[True, False], cut=[True, False])
    as_float = res.map(lambda t: t.float())  # what the trainer's DP gather hands over
    assert reward_diagnostics(as_float, torch.tensor([1.0, 2.0])) == reward_diagnostics(res, torch.tensor([1.0, 2.0]))


def test_topic_subject_flags_on_hand_written_answers():
    """The subject is the noun after the leading article; the demo's collapsed answers have none."""
    cases = [
        ("a dog is a loyal pet that barks at strangers.", "dog", 1.0),
        ("An apple is a crunchy red or green fruit.", "apple", 1.0),  # case and "an"
        ("the dog, a loyal pet.", "dog", 1.0),
        ("a and is a loyal pet that barks at strangers.", "dog", 0.0),  # issue 17's collapsed answer
        ("a loyal pet that barks at strangers.", "dog", 0.0),  # subject dropped
        ("a cat is a loyal pet that barks at strangers.", "dog", 0.0),  # another topic
        ("a dogs life.", "dog", 0.0),  # whole words only
        ("dog is a loyal pet.", "dog", 0.0),  # no leading article
        ("my dog is a loyal pet.", "dog", 0.0),
        ("", "dog", 0.0),
        ("a ice cream is cold.", "ice cream", 1.0),  # a topic of several words
        ("a ice is cold.", "ice cream", 0.0),
    ]
    flags = topic_subject_flags([r for r, _, _ in cases], [t for _, t, _ in cases])
    assert flags.tolist() == [want for _, _, want in cases]
    # prompts without a topic: NaN, left out of the rate
    mixed = topic_subject_flags(["a dog is here.", "a cat is here.", "a dog is here."], ["dog", None, "cat"])
    assert mixed[0] == 1.0 and math.isnan(mixed[1]) and mixed[2] == 0.0 and float(mixed.nanmean()) == 0.5
    with pytest.raises(ValueError):
        topic_subject_flags(["a dog."], [])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -1.0001])
def test_out_of_range_reward_is_an_error(bad: float):
    with pytest.raises(RewardRangeError, match=r"rewards\[1\]"):
        _result([0.1, 0.2], rewards=[0.1, bad]).check()
    with pytest.raises(RewardRangeError, match=r"cosine\[0\]"):
        _result([bad, 0.2], rewards=[-1.0, 0.2]).check()  # penalized rows still need a sane cosine
    assert _result([-1.0, 1.0]).check() is not None


def test_result_slice_and_cat_round_trip():
    res = _result([0.1, 0.2, 0.3], empty=[True, False, True], repeat=[5, -1, 7])
    again = RewardResult.cat([res.slice(0, 1), res.slice(1, 3)])
    for name in ("rewards", "cosine", "penalized", "cut", "chunked", "empty", "repeat_length"):
        assert torch.equal(getattr(again, name), getattr(res, name)), name
    assert len(RewardResult.cat([])) == 0


def _items(n: int):
    prompts = [f"prompt {i}" for i in range(n)]
    responses = ["#" + (LOOP * 10)[: 50 + 80 + 7 * i] + "!" for i in range(n)]  # repeat length 80 + 7i
    references = ["r" * (300 + 50 * i) for i in range(n)]
    return prompts, responses, references


@pytest.mark.parametrize("workers", [0, 2])
def test_runner_flags_and_exact_lengths_on_the_first_k(workers: int):
    penalty = RepetitionPenalty()
    prompts, responses, references = _items(12)
    runner = RepetitionRunner(penalty, workers=workers, measure_first=5)
    try:
        flags, lengths = runner.submit(prompts, responses, references).result(timeout=120)
    finally:
        runner.close()
    assert flags == [penalty.is_penalized(r, ref, p) for p, r, ref in zip(prompts, responses, references)]
    assert any(flags) and not all(flags)
    assert lengths[:5] == [longest_repeated_substring_length(r) for r in responses[:5]] == [80 + 7 * i for i in range(5)]
    assert lengths[5:] == [-1] * 7


def test_score_reports_repeat_lengths_and_empty():
    reward = EmbeddingSimilarityReward(measure_first=2)
    loop = "#" + (LOOP * 10)[:170] + "!"  # repeats 120 chars
    res = reward.score(["p"] * 3, [loop, "   ", "fine answer"], ["a reference answer"] * 3)
    assert res.repeat_length.tolist() == [120, 2, -1]  # "   " repeats "  "
    assert res.empty.tolist() == [False, True, False]
    assert res.penalized.tolist() == [True, False, False]
    reward.close()
