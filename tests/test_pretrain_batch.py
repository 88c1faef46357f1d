"""Base pre-training's documents: answers after prompts (their own with a set probability, else
random ones), loss on the answers only."""

from collections import Counter

import pytest
import torch

from nemo_rlsr.config import load_config
from nemo_rlsr.config.rules import config_problems
from nemo_rlsr.trainer.pretrain import prompted_answer_batch

EOS = 1
# Disjoint id ranges, so every token says which prompt or answer it came from: prompt k starts with
# 10 * (k + 1), answer a with 100 * (a + 1). Answer a's own prompts are k with k // 2 == a.
PROMPTS = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40, 41], [50, 51, 52], [60, 61]]
ANSWERS = [[100, 101, 102, 103], [200, 201, 202], [300, 301, 302, 303, 304]]
PAIRS = [(prompt, ANSWERS[k // 2]) for k, prompt in enumerate(PROMPTS)]


def documents(row: list[int]) -> list[tuple[int, int]]:
    """(prompt, answer) index pairs of the whole documents in a window, read off the id ranges."""
    pairs = []
    for i, token in enumerate(row):
        if 10 <= token < 100 and token % 10 == 0:  # a prompt's first token
            prompt = token // 10 - 1
            j = i + len(PROMPTS[prompt])
            if j < len(row) and row[j] >= 100 and row[j] % 100 == 0:
                answer = row[j] // 100 - 1
                if j + len(ANSWERS[answer]) < len(row):  # its <eos> is in the window too
                    pairs.append((prompt, answer))
    return pairs


def test_loss_mask_marks_exactly_the_answer_and_eos_targets():
    batch = prompted_answer_batch(PAIRS, 0.0, EOS, rows=64, length=16, generator=torch.Generator().manual_seed(0))
    assert batch.input_ids.shape == (64, 16) and batch.valid.all()
    targets = batch.targets
    answer_or_eos = (targets >= 100) | (targets == EOS)
    assert torch.equal(batch.loss_mask[:, :-1].bool(), answer_or_eos[:, :-1])
    assert not batch.loss_mask[:, -1].any()  # no next token inside the window
    for row in batch.input_ids.tolist():  # documents are `prompt answer <eos>`, whole
        for k in range(len(row) - 1):
            if row[k] == EOS:
                assert row[k + 1] in {p[0] for p in PROMPTS}, row  # a prompt starts after each <eos>
            if row[k] >= 100 and row[k] % 100 == len(ANSWERS[row[k] // 100 - 1]) - 1:
                assert row[k + 1] == EOS, row  # an answer's last token is followed by <eos>


@pytest.mark.parametrize("own_fraction", [0.0, 0.5])
def test_prompt_is_its_own_with_the_set_probability_else_uniform(own_fraction):
    """P(a given prompt before an answer) = own_fraction / (its own prompts) + (1 - own_fraction) /
    (all prompts) for its own prompts, (1 - own_fraction) / (all prompts) for the others: at 0 the
    base sees where answers start, never which answer a prompt asks for."""
    batch = prompted_answer_batch(PAIRS, own_fraction, EOS, rows=600, length=40,
                                  generator=torch.Generator().manual_seed(1))
    pairs = Counter(p for row in batch.input_ids.tolist() for p in documents(row))
    for answer in range(len(ANSWERS)):
        seen = sum(pairs[(prompt, answer)] for prompt in range(len(PROMPTS)))
        assert seen > 500
        for prompt in range(len(PROMPTS)):
            own = prompt // 2 == answer
            expected = (own_fraction / 2 if own else 0.0) + (1 - own_fraction) / len(PROMPTS)
            assert abs(pairs[(prompt, answer)] / seen - expected) < 0.05, (answer, prompt, own_fraction)


def test_same_generator_seed_same_batch():
    a = prompted_answer_batch(PAIRS, 0.3, EOS, 8, 16, torch.Generator().manual_seed(3))
    b = prompted_answer_batch(PAIRS, 0.3, EOS, 8, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)


def test_own_prompt_fraction_outside_0_1_is_a_config_error():
    for bad in (-0.1, 1.5):
        cfg = load_config("conf/rlsr_tiny.yaml", [f"pretrain.own_prompt_fraction={bad}"])
        assert f"pretrain.own_prompt_fraction must be in [0, 1], got {bad}" in config_problems(cfg, "rlsr")
    for ok in (0.0, 1.0):
        cfg = load_config("conf/rlsr_tiny.yaml", [f"pretrain.own_prompt_fraction={ok}"])
        assert not any("own_prompt_fraction" in p for p in config_problems(cfg, "rlsr"))
