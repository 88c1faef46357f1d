"""Composable reward terms (`reward.terms`, `reward.combine`; nemo_rlsr/rewards/terms.py, docs/rewards.md):
hand-computed combinations, the default list reproducing the embedding reward bit for bit, user
functions from a file outside the package, weight-0 terms logged and not trained on, bad term
configs refused with their key, and the reward-hacking signals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_rlsr.config import ConfigError, RLSRConfig, RewardConfig, RewardTermConfig, from_dict, load_config, to_dict
from nemo_rlsr.config.rules import config_problems
from nemo_rlsr.rewards.diagnostics import TrendWindow, length_ratios, slope, tied_group_fraction
from nemo_rlsr.rewards.result import RewardResult
from nemo_rlsr.rewards.terms import RewardTerms, combine_terms, overlong_penalty

REPO = Path(__file__).resolve().parents[1]
S3 = math.sqrt(3.0)


def result(cosine: list[float], penalized: list[bool], penalty: float = -1.0) -> RewardResult:
    """What a reward actor returns for these cosines and repetition flags."""
    cos = torch.tensor(cosine, dtype=torch.float32)
    flags = torch.tensor(penalized)
    b = torch.zeros(len(cosine), dtype=torch.bool)
    return RewardResult(torch.where(flags, torch.full_like(cos, penalty), cos), cos, flags, b, b.clone(), b.clone(),
                        torch.full((len(cosine),), -1, dtype=torch.long))


def terms_of(*terms: RewardTermConfig, combine: str = "weighted_sum", group: int = 2, max_new_tokens: int = 20,
             eps: float = 0.0) -> RewardTerms:
    cfg = RewardConfig(terms=list(terms), combine=combine)
    assert config_problems(RLSRConfig(reward=cfg), "rlsr") == []
    return RewardTerms(cfg, max_new_tokens, group, eps)


# ---- the combination, by hand ------------------------------------------------------------------------


def test_weighted_sum_by_hand():
    values = torch.tensor([[0.5, 0.0, 1.0], [0.2, -1.0, 0.0], [-0.4, -0.5, 1.0]])
    weights = torch.tensor([1.0, 0.5, 2.0])
    expected = torch.tensor([0.5 + 0.0 + 2.0, 0.2 - 0.5 + 0.0, -0.4 - 0.25 + 2.0])
    assert torch.allclose(combine_terms(values, weights), expected, atol=1e-7)


def test_group_normalized_by_hand():
    """Each term normalised within its group of 3 (unbiased std, eps 0), then weighted: term A
    [0, 1, 2] -> [-1, 0, 1]; term B ties -> 0 whatever its weight; term C [0, 0, 3] -> [-1, -1, 2] / sqrt(3).
    Second group: A [4, 4, 4] ties, B [1, 2, 3] -> [-1, 0, 1], C [3, 0, 0] -> [2, -1, -1] / sqrt(3)."""
    values = torch.tensor([[0.0, 5.0, 0.0], [1.0, 5.0, 0.0], [2.0, 5.0, 3.0],
                           [4.0, 1.0, 3.0], [4.0, 2.0, 0.0], [4.0, 3.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 7.0, 0.5], dtype=torch.float64)
    expected = torch.tensor([-1 - 0.5 / S3, -0.5 / S3, 1 + 1 / S3,
                             -7 + 1 / S3, -0.5 / S3, 7 - 0.5 / S3], dtype=torch.float64)
    got = combine_terms(values, weights, group_size=3, eps=0.0)
    assert torch.allclose(got, expected, atol=1e-12), got
    # Not the same as normalising the weighted sum: the scale of B (weight 7) would drown A and C.
    assert not torch.allclose(combine_terms(combine_terms(values, weights)[:, None], torch.ones(1, dtype=torch.float64),
                                            group_size=3, eps=0.0), expected, atol=1e-3)


def test_replacement_overrides_the_sum():
    values = torch.tensor([[0.3, 0.0], [0.6, -1.0]])
    got = combine_terms(values, torch.tensor([2.0, 0.0]), replaced=torch.tensor([False, True]),
                        replacement=values[:, 1])
    assert got.tolist() == pytest.approx([0.6, -1.0])


@pytest.mark.parametrize("combine", ["weighted_sum", "group_normalized"])
def test_weight_zero_term_is_logged_not_trained_on(combine):
    terms = terms_of(RewardTermConfig(kind="cosine"), RewardTermConfig(kind="regex", pattern="!", weight=0.0),
                     combine=combine)
    scores = result([0.1, 0.4, 0.9, 0.2], [False] * 4)
    quiet = terms.evaluate(scores, ["p"] * 4, ["a", "b", "c", "d"], ["r"] * 4, torch.tensor([1, 1, 1, 1]), 1)
    loud = terms.evaluate(scores, ["p"] * 4, ["a!", "b", "c!", "d!"], ["r"] * 4, torch.tensor([1, 1, 1, 1]), 1)
    assert quiet.names == ["cosine", "regex"]
    assert loud.values[:, 1].tolist() == [1.0, 0.0, 1.0, 1.0]  # computed, for the metrics
    assert torch.equal(terms.combine(quiet), terms.combine(loud))  # and not in the reward
    weighted = terms_of(RewardTermConfig(kind="cosine"), RewardTermConfig(kind="regex", pattern="!", weight=0.5),
                        combine=combine)
    assert not torch.equal(weighted.combine(weighted.evaluate(scores, ["p"] * 4, ["a!", "b", "c!", "d!"], ["r"] * 4,
                                                              torch.tensor([1, 1, 1, 1]), 1)),
                           terms.combine(loud))  # control: with a weight it does count


# ---- the default list is today's reward ------------------------------------------------------------------


def test_default_terms_reproduce_the_embedding_reward_bitwise():
    """The reward actor's rewards (cosine, replaced by the penalty where the repetition check fires)
    and the default term list's agree bit for bit, on MiniLM's real cosines and a penalized loop."""
    from nemo_rlsr.rewards import EmbeddingSimilarityReward

    actor = EmbeddingSimilarityReward()
    try:
        reference = "The mitochondria is the powerhouse of the cell, producing ATP through respiration."
        responses = ["Mitochondria make ATP for the cell.", "I like trains.", "", "ATP " * 60,
                     "the cell " * 40, "Cells get energy from mitochondria via respiration."]
        scores = actor.score(["q"] * 6, responses, [reference] * 6)
    finally:
        actor.close()
    assert scores.penalized.any() and not scores.penalized.all()
    cfg = RewardConfig()
    assert config_problems(RLSRConfig(reward=cfg), "rlsr") == []
    terms = RewardTerms(cfg, 20, 3, 1e-6)
    values = terms.evaluate(scores, ["q"] * 6, responses, [reference] * 6, torch.full((6,), 5), 1)
    assert values.names == ["cosine", "repetition"]
    combined = terms.combine(values)
    assert combined.dtype == scores.rewards.dtype and torch.equal(combined, scores.rewards)
    # Negative control: cosine alone (no replacing term) differs exactly on the penalized rows.
    cosine_only = terms_of(RewardTermConfig(kind="cosine"), group=3)
    alone = cosine_only.combine(cosine_only.evaluate(scores, ["q"] * 6, responses, [reference] * 6,
                                                     torch.full((6,), 5), 1))
    assert torch.equal(alone != scores.rewards, scores.penalized)


# ---- each kind -------------------------------------------------------------------------------------------


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    assert overlong_penalty(lengths, 20, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1, -1])
    assert overlong_penalty(lengths, 20, 0).tolist() == pytest.approx([0, 0, 0, 0, 0, -1])
    terms = terms_of(RewardTermConfig(kind="cosine", weight=0.0), RewardTermConfig(kind="overlong", buffer_tokens=4),
                     max_new_tokens=20)  # max_tokens null: rollout.max_new_tokens
    got = terms.evaluate(result([0.0] * 6, [False] * 6), [""] * 6, [""] * 6, [""] * 6, lengths, 1)
    assert got.values[:, 1].tolist() == pytest.approx([0, 0, -0.25, -0.5, -1, -1])


def test_regex_and_repetition_add_terms():
    terms = terms_of(RewardTermConfig(kind="cosine"), RewardTermConfig(kind="regex", pattern=r"^<answer>.*</answer>$",
                                                                       weight=0.5),
                     RewardTermConfig(kind="repetition", weight=0.25))
    scores = result([0.5, 0.5, -0.5, 0.2], [False, True, False, True])
    responses = ["<answer>x</answer>", "x", "<answer>y</answer> tail", "<answer>z</answer>"]
    got = terms.combine(terms.evaluate(scores, ["p"] * 4, responses, ["r"] * 4, torch.ones(4), 1))
    assert got.tolist() == pytest.approx([0.5 + 0.5, 0.5 - 0.25, -0.5, 0.2 + 0.5 - 0.25])


USER_TERM = """
def brevity(prompt, response, reference, step):
    return step + len(response) / max(len(reference), 1)

def broken(prompt, response, reference, step):
    return float("nan")
"""


def test_user_function_from_a_file_outside_the_package(tmp_path, monkeypatch):
    path = tmp_path / "my_terms.py"
    path.write_text(USER_TERM)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"defaults: [{REPO / 'conf/rlsr_tiny.yaml'}]\nreward:\n  terms:\n    - kind: cosine\n"
                    f"    - {{kind: function, name: brevity, function: '{path}:brevity', weight: 0.5}}\n")
    cfg = load_config(conf)
    assert cfg.reward.terms[1] == RewardTermConfig(kind="function", name="brevity", function=f"{path}:brevity",
                                                   weight=0.5)
    assert from_dict(to_dict(cfg), "saved") == cfg  # a checkpoint's copy rebuilds the terms
    assert config_problems(cfg, "rlsr") == []
    terms = RewardTerms(cfg.reward, 20, 2, 1e-6)
    got = terms.evaluate(result([0.1, 0.2], [False, False]), ["p", "p"], ["abcd", "ab"], ["abcd", "abcd"],
                         torch.ones(2), 3)
    assert got.values[:, 1].tolist() == pytest.approx([3 + 1.0, 3 + 0.5])
    assert terms.combine(got).tolist() == pytest.approx([0.1 + 0.5 * 4.0, 0.2 + 0.5 * 3.5])
    # The same function as `module:function` from sys.path.
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = terms_of(RewardTermConfig(kind="function", function="my_terms:brevity"))
    assert by_module.evaluate(result([0.0], [False]), ["p"], ["ab"], ["abcd"], torch.ones(1), 2).values[0, 0] == 2.5


def test_user_function_returning_nan_is_an_error(tmp_path):
    (tmp_path / "t.py").write_text(USER_TERM)
    terms = terms_of(RewardTermConfig(kind="cosine"),
                     RewardTermConfig(kind="function", function=f"{tmp_path}/t.py:broken"))
    with pytest.raises(ValueError, match="'function'.*returned nan for rollout 0"):
        terms.evaluate(result([0.0], [False]), ["p"], ["x"], ["y"], torch.ones(1), 1)


# ---- bad configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("terms, combine, key", [
    ([{"kind": "lenght"}], "weighted_sum", "reward.terms[0].kind"),
    ([{"kind": "cosine"}, {"kind": "regex", "pattern": "(unclosed"}], "weighted_sum", "reward.terms[1].pattern"),
    ([{"kind": "cosine"}, {"kind": "regex"}], "weighted_sum", "reward.terms[1].pattern"),
    ([{"kind": "cosine"}, {"kind": "function", "function": "/no/such/file.py:f"}], "weighted_sum",
     "reward.terms[1].function"),
    ([{"kind": "cosine"}, {"kind": "function", "function": "json:no_such_function"}], "weighted_sum",
     "reward.terms[1].function"),
    ([{"kind": "cosine"}, {"kind": "function", "function": "no_colon"}], "weighted_sum", "reward.terms[1].function"),
    ([{"kind": "cosine"}, {"kind": "cosine"}], "weighted_sum", "reward.terms[1].name"),
    ([{"kind": "cosine", "name": "a/b"}], "weighted_sum", "reward.terms[0].name"),
    ([{"kind": "cosine", "replace": True}], "weighted_sum", "reward.terms[0].replace"),
    ([{"kind": "cosine"}, {"kind": "repetition", "replace": True, "weight": 0.5}], "weighted_sum",
     "reward.terms[1].weight"),
    ([{"kind": "cosine", "weight": 0.0}], "weighted_sum", "reward.terms"),
    ([{"kind": "cosine"}, {"kind": "overlong", "max_tokens": 8, "buffer_tokens": 8}], "weighted_sum",
     "reward.terms[1].buffer_tokens"),
    ([{"kind": "cosine", "pattern": "x"}], "weighted_sum", "reward.terms[0].pattern"),
    ([], "group_normalized", "reward.terms (default).replace"),
    ([{"kind": "cosine"}], "sum", "reward.combine"),
])
def test_bad_term_config_names_the_key(terms, combine, key):
    base = to_dict(RLSRConfig())
    base["reward"] |= {"terms": terms, "combine": combine}
    problems = config_problems(from_dict(base, "test"), "rlsr")
    assert len(problems) >= 1 and any(key in p for p in problems), problems


def test_unknown_or_mistyped_term_key_names_key_and_file(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("reward:\n  terms:\n    - {kind: cosine, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key `reward\.terms\[0\]\.wieght`"):
        load_config(conf)
    conf.write_text("reward:\n  terms:\n    - {kind: cosine, weight: heavy}\n")
    with pytest.raises(ConfigError, match=r"`reward\.terms\[0\]\.weight` must be float"):
        load_config(conf)
    conf.write_text("reward:\n  terms: [cosine]\n")
    with pytest.raises(ConfigError, match=r"`reward\.terms\[0\]` must be a mapping"):
        load_config(conf)


def test_group_normalized_with_a_non_replacing_repetition_term_is_accepted():
    terms = terms_of(RewardTermConfig(kind="cosine"), RewardTermConfig(kind="repetition", weight=0.5),
                     combine="group_normalized")
    scores = result([0.1, 0.3, 0.5, 0.5], [True, False, False, False])
    got = terms.combine(terms.evaluate(scores, ["p"] * 4, ["a"] * 4, ["r"] * 4, torch.ones(4), 1))
    r = 1 / math.sqrt(2)  # a pair [x, y] normalises to [-+1/sqrt(2), +-1/sqrt(2)]; the second pair ties
    assert got.tolist() == pytest.approx([-r - 0.5 * r, r + 0.5 * r, 0.0, 0.0])


def test_cli_refuses_a_bad_term_with_exit_2(tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text(f"defaults: [{REPO / 'conf/rlsr_tiny.yaml'}]\nreward:\n  terms:\n    - kind: cosine\n"
                    f"    - {{kind: function, function: '{tmp_path}/missing.py:f'}}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "nemo_rlsr.cli", "train", "--config", str(conf),
                          f"trainer.output_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "reward.terms[1].function" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ---- reward-hacking signals ---------------------------------------------------------------------------------


def test_tied_groups_length_ratio_and_slope_by_hand():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.2, 0.3, -1.0, -1.0, -1.0 + 1e-9, 0.0, 0.0, 0.1])
    assert tied_group_fraction(rewards, 3) == pytest.approx(2 / 4)  # the 1e-9 spread counts as a tie
    assert length_ratios(["ab", "abcd", "x"], ["abcd", "ab", ""]).tolist() == pytest.approx([0.5, 2.0, 1.0])
    assert slope([3.0, 2.5, 2.0, 1.5]) == pytest.approx(-0.5)
    assert slope([1.0, 2.0, 2.0, 5.0]) == pytest.approx(1.2)  # least squares: (-1.5, -.5, .5, 1.5) . y / 5
    assert slope([4.0]) == 0.0


def test_the_trend_window_keeps_its_last_values_and_restores_them():
    window = TrendWindow(3)
    assert [window.add(v) for v in (1.0, 3.0)] == [0.0, pytest.approx(2.0)]
    assert window.add(5.0) == pytest.approx(2.0) and window.add(4.0) == pytest.approx(0.5)  # window 3, 5, 4
    restored = TrendWindow(3)
    restored.load_state_dict(json.loads(json.dumps(window.state_dict())))  # as the checkpoint's extra stores it
    assert restored.add(0.0) == window.add(0.0) == pytest.approx(-2.5)  # 5, 4, 0


# ---- through the trainer ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_logs_every_term_and_trains_on_the_weighted_ones(tmp_path):
    """2 RLSR steps with a user function from a tmp file logged at weight 0: its metric is the step
    number (hand value), and the trained reward is the cosine alone (no repetition term listed)."""
    from cli_runner import cli

    (tmp_path / "step_term.py").write_text("def step(prompt, response, reference, step):\n    return float(step)\n")
    out = tmp_path / "run"
    args = ["pretrain.steps=10", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8",
            "rollout.max_new_tokens=12", "trainer.progress_bar=false", "trainer.steps=2", "trainer.heldout_eval=false",
            f"trainer.output_dir={out}",
            f"reward.terms=[{{kind: cosine}}, {{kind: function, name: clock, weight: 0, "
            f"function: '{tmp_path}/step_term.py:step'}}, {{kind: overlong, buffer_tokens: 4, weight: 0}}]"]
    cli("train", "rlsr_tiny.yaml", args, timeout=600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["reward/term/clock/mean"] == r["step"] and r["reward/term/clock/std"] == 0.0
        assert r["reward/mean"] == pytest.approx(r["reward/term/cosine/mean"], abs=1e-6)
        assert -1.0 <= r["reward/term/overlong/mean"] <= 0.0
        assert 0.0 <= r["reward/tied_group_fraction"] <= 1.0 and r["reward/length_ratio_to_reference"] > 0
        assert "entropy/trend" in r
