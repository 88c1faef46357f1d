"""Token-budget micro-batches (models/microbatches.py): the grouping, the config rule, the planner,
and a real policy giving the logprobs, loss and gradient norm of fixed micro-batches."""

import pytest
import torch

from nemo_rlsr.algorithms.grpo import GRPOLossConfig
from nemo_rlsr.config import ModelConfig, OptimizerConfig, load_config
from nemo_rlsr.config.rules import config_problems
from nemo_rlsr.models.microbatches import (agree_across_ranks, padded_fraction, plan_micro_batches, row_lengths,
                                           token_budget_groups)
from nemo_rlsr.models.policy import MegatronPolicy, TokenBatch
from nemo_rlsr.trainer.rlsr import grpo_loss_fn

VOCAB, PAD = 61, 0
MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_sequence_length=48)
WIDTH = 48


def test_groups_longest_first_within_budget():
    # sorted: 12 (row 1), 12 (row 3), 7, 5, 3, 1; widths rounded up to 4: 12, 8, 4
    assert token_budget_groups([5, 12, 3, 12, 7, 1], budget=24, multiple=4) == [[1, 3], [4, 0, 2], [5]]
    assert token_budget_groups([5, 5, 5], budget=100, multiple=1) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="13 tokens .16 with the sequence multiple 8. exceeds max_tokens_per_microbatch=15"):
        token_budget_groups([3, 13], budget=15, multiple=8)


def rollout_batch(rows: int, seed: int) -> TokenBatch:
    """Rollout-shaped rows: [left pad | prompt | response | right pad], long-tailed response lengths,
    GRPO's extras (per-row advantages, per-token old and reference logprobs)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, WIDTH), PAD, dtype=torch.long)
    valid = torch.zeros(rows, WIDTH, dtype=torch.bool)
    loss_mask = torch.zeros(rows, WIDTH)
    prompt_end = 10
    for r in range(rows):
        prompt = int(torch.randint(3, prompt_end + 1, (1,), generator=g))
        response = min(int(torch.distributions.Exponential(1 / 8).sample()) + 1, WIDTH - prompt_end)
        start, end = prompt_end - prompt, prompt_end + response
        ids[r, start:end] = torch.randint(1, VOCAB, (end - start,), generator=g)
        valid[r, start:end] = True
        loss_mask[r, prompt_end - 1 : end - 1] = 1.0  # targets[t] = ids[t + 1]: the response tokens
    extras = {"advantages": torch.randn(rows, generator=g),
              "old_logprobs": -torch.rand(rows, WIDTH, generator=g) * 3,
              "ref_logprobs": -torch.rand(rows, WIDTH, generator=g) * 3}
    return TokenBatch(ids, valid, loss_mask, extras)


def test_plan_covers_every_row_once_and_cuts_columns():
    batch = rollout_batch(12, seed=1)
    lengths = row_lengths(batch)
    micro = plan_micro_batches(batch, micro_batch_size=4, max_tokens=64, multiple=4)
    assert sorted(r for mb in micro for r in mb.rows) == list(range(12))
    for mb in micro:
        rows, width = mb.batch.input_ids.shape
        assert rows * width <= 64 and width % 4 == 0 and width >= max(lengths[r] for r in mb.rows)
        assert torch.equal(mb.batch.input_ids, batch.input_ids[mb.rows, :width])
        assert torch.equal(mb.batch.extras["advantages"], batch.extras["advantages"][mb.rows])
        assert torch.equal(mb.batch.extras["old_logprobs"], batch.extras["old_logprobs"][mb.rows, :width])
    fixed = plan_micro_batches(batch, micro_batch_size=4, max_tokens=None, multiple=4)
    assert [mb.rows for mb in fixed] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert padded_fraction(micro) < padded_fraction(fixed)


def test_fillers_round_the_count_and_count_no_token():
    batch = rollout_batch(6, seed=2)
    micro = plan_micro_batches(batch, micro_batch_size=2, max_tokens=None, multiple=1)
    agreed = agree_across_ranks(micro, batch, count_multiple=4, group=None)
    assert len(agreed) == 4 and agreed[3].rows == []
    assert agreed[3].batch.input_ids.shape == micro[-1].batch.input_ids.shape
    assert agreed[3].batch.loss_mask.sum() == 0 and agreed[3].batch.valid.any()


def twin_policies(ctx) -> tuple[MegatronPolicy, MegatronPolicy]:
    torch.manual_seed(0)
    first = MegatronPolicy(MODEL, OptimizerConfig(lr=1e-3), VOCAB, ctx)
    torch.manual_seed(0)
    return first, MegatronPolicy(MODEL, OptimizerConfig(lr=1e-3), VOCAB, ctx)


def test_token_budget_equals_fixed_micro_batches(single_rank):
    """Logprobs (in the batch's row order), GRPO loss and gradient norm of token-budget micro-batches
    equal those of fixed micro-batches, and so does every parameter's gradient."""
    batch = rollout_batch(16, seed=3)
    fixed_policy, budget_policy = twin_policies(single_rank)
    budget = 96  # 2 rows of the full 48 columns
    groups = [mb.rows for mb in plan_micro_batches(batch, 4, budget, budget_policy.sequence_multiple)]
    # really regrouped (not 4 rows each) and reordered
    assert sorted(map(len, groups)) != [4] * 4 and [r for g in groups for r in g] != list(range(16))

    lp_fixed = fixed_policy.logprobs(batch, 4)
    lp_budget = budget_policy.logprobs(batch, 4, max_tokens=budget)
    mask = batch.loss_mask.bool()
    assert mask.sum() > 0
    torch.testing.assert_close(lp_budget[mask], lp_fixed[mask], atol=1e-6, rtol=0)

    loss_fn = grpo_loss_fn(GRPOLossConfig(kl_coef=0.1))
    batch.extras["old_logprobs"] = torch.where(mask, lp_fixed + 0.05 * torch.randn(lp_fixed.shape), 0.0)
    fixed = fixed_policy.train_step(batch, 4, loss_fn)
    tokenwise = budget_policy.train_step(batch, 4, loss_fn, max_tokens=budget)
    assert tokenwise["num_tokens"] == fixed["num_tokens"] == float(mask.sum())
    assert abs(tokenwise["loss"] - fixed["loss"]) < 1e-6
    assert abs(tokenwise["grad_norm"] - fixed["grad_norm"]) < 1e-6
    assert tokenwise["kl"] == pytest.approx(fixed["kl"], rel=1e-6)  # ~16: fp32 rounding of the sum
    # The reduced gradients (megatron's main_grad buffers, kept after the step), not the weights:
    # Adam divides by sqrt(v), so a near-zero gradient entry turns last-bit rounding into a visible
    # weight difference (CI saw 4e-6 on one of 16384 entries after other tests had run).
    for a, b in zip(fixed_policy.weights.parameters(), budget_policy.weights.parameters()):
        torch.testing.assert_close(b.main_grad, a.main_grad, atol=1e-6, rtol=0)


def test_mean_of_micro_batch_means_would_differ(single_rank):
    """Negative control for the test above: the per-token normaliser over the whole step is what makes
    the two agree; the mean of micro-batch token means (what a per-micro-batch normaliser gives) of
    the same logprobs differs between the two groupings."""
    batch = rollout_batch(16, seed=3)
    policy, _ = twin_policies(single_rank)
    lp = policy.logprobs(batch, 4)
    mask = batch.loss_mask

    def mean_of_means(groups):
        return sum(float((-lp[g] * mask[g]).sum() / mask[g].sum()) for g in groups) / len(groups)

    budget_groups = [mb.rows for mb in plan_micro_batches(batch, 4, 96, policy.sequence_multiple)]
    fixed_groups = [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert abs(mean_of_means(budget_groups) - mean_of_means(fixed_groups)) > 1e-3


def test_config_rule_names_the_key():
    cfg = load_config("conf/rlsr_tiny.yaml", ["grpo.max_tokens_per_microbatch=8"])
    assert any("grpo.max_tokens_per_microbatch=8 is below model.max_sequence_length" in p
               for p in config_problems(cfg, "rlsr"))
    limit = cfg.model.max_sequence_length
    for value in (0, limit, 4 * limit):
        ok = load_config("conf/rlsr_tiny.yaml", [f"grpo.max_tokens_per_microbatch={value}"])
        assert not any("max_tokens_per_microbatch" in p for p in config_problems(ok, "rlsr"))
    sft = load_config("conf/sft_tiny.yaml", ["sft.max_tokens_per_microbatch=-1"])
    assert any("sft.max_tokens_per_microbatch must be > 0" in p for p in config_problems(sft, "sft"))


def test_planner_counts_the_budget_not_the_row_count():
    """Activation memory of a budget of 2 full rows = that of fixed 2-row micro-batches, whatever
    grpo.micro_batch_size says (tests/test_planner_memory.py checks it against a measured peak)."""
    from nemo_rlsr.planner import make_plan

    def activations(*overrides):
        return make_plan(load_config("conf/rlsr_tiny.yaml", list(overrides))).memory.items["activations"]

    seq = load_config("conf/rlsr_tiny.yaml").model.max_sequence_length
    budget = activations(f"grpo.max_tokens_per_microbatch={2 * seq}", "grpo.micro_batch_size=32")
    assert budget == pytest.approx(activations("grpo.micro_batch_size=2"))
    assert budget < activations("grpo.micro_batch_size=32") / 8


@pytest.mark.slow
def test_benchmark_prints_both_variants_and_ratio():
    import json

    from cli_runner import run_python

    result = run_python(["benchmarks/microbatch_bench.py", "--rows", "8", "--max-len", "256", "--steps", "1",
                         "--micro-batch-size", "2"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "fixed:" in result.stdout and "token budget:" in result.stdout
    assert "step time, token budget / fixed:" in result.stdout
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["token budget"]["padded_fraction"] <= numbers["fixed"]["padded_fraction"]
    assert numbers["loss_abs_diff"] < 1e-6 and numbers["grad_norm_abs_diff"] < 1e-6
