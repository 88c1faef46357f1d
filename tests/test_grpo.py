"""Tests for the GRPO core; expected values are computed by hand with Python floats."""

import math

import pytest
import torch

from nemo_rlsr.algorithms.grpo import (
    GRPOLossConfig,
    group_advantages,
    grpo_loss,
    tis_metrics,
    tis_weights,
)

EPS = 1e-6


# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_example():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=3, eps=EPS)
    # group 1: mean 2, unbiased std sqrt((1+0+1)/2) = 1 (biased would be 0.816)
    expected = torch.tensor([-1.0 / (1 + EPS), 0.0, 1.0 / (1 + EPS)])
    torch.testing.assert_close(adv[:3], expected, rtol=0, atol=1e-7)
    assert torch.equal(adv[3:], torch.zeros(3))  # constant group: exactly 0


def test_group_advantages_not_divisible_raises():
    with pytest.raises(ValueError):
        group_advantages(torch.arange(7.0), group_size=3)


def test_group_advantages_noise_below_threshold_is_zero():
    # std 1e-10 <= 1e-8: without the threshold, noise / (std + eps) would give ~±1e-4.
    rewards = torch.tensor([0.0, 1e-10, -1e-10, 1.0, 2.0, 3.0], dtype=torch.float64)
    adv = group_advantages(rewards, group_size=3)
    assert torch.equal(adv[:3], torch.zeros(3, dtype=torch.float64))
    assert adv[3:].abs().sum() > 1.0


# ---------------------------------------------------------------- grpo_loss


def test_grpo_loss_hand_example():
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1)
    # Row 0, A=+1: t0 ratio e^0.1 inside; t1 ratio e^0.5 > 1.28 (clipped);
    #              t2 masked out but holding huge values.
    # Row 1, A=-2: t0 ratio e^-0.5 < 0.8 (clipped); t1 ratio e^0.5 > 1.28 but
    #              A<0 so the unclipped branch wins (not clipped); t2 ratio e^-0.2 inside.
    lp = [[-1.0, -0.5, 100.0], [-2.0, -0.5, -0.3]]
    old = [[-1.1, -1.0, -100.0], [-1.5, -1.0, -0.1]]
    ref = [[-1.2, -0.5, 50.0], [-1.8, -0.5, -0.7]]
    adv = [1.0, -2.0]
    mask = [[1, 1, 0], [1, 1, 1]]
    lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high

    exp_pg = exp_kl = exp_ratio = 0.0
    exp_clipped = 0
    for b in range(2):
        for t in range(3):
            if not mask[b][t]:
                continue
            r = math.exp(lp[b][t] - old[b][t])
            a = adv[b]
            c = min(max(r, lo), hi)
            exp_pg += -min(r * a, c * a)
            exp_clipped += c * a < r * a
            d = ref[b][t] - lp[b][t]
            exp_kl += math.exp(d) - d - 1
            exp_ratio += r
    assert exp_clipped == 2  # the hand example covers both clip sides

    logprobs = torch.tensor(lp, requires_grad=True)
    # A sum over the valid tokens: the policy divides by the step's global token count.
    loss, m = grpo_loss(
        logprobs,
        torch.tensor(old),
        torch.tensor(ref),
        torch.tensor(adv),
        torch.tensor(mask),
        cfg,
    )
    expected = exp_pg + cfg.kl_coef * exp_kl
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["clip_fraction"].item() == 2
    assert m["kl"].item() == pytest.approx(exp_kl, rel=1e-6)
    assert m["pg_loss"].item() == pytest.approx(exp_pg, rel=1e-6)
    assert m["ratio"].item() == pytest.approx(exp_ratio, rel=1e-6)
    assert not any(v.requires_grad for v in m.values())

    loss.backward()
    g = logprobs.grad
    assert torch.isfinite(g).all()
    assert g[0, 2] == 0.0  # masked token: no gradient despite huge values
    # Clipped tokens get only the KL gradient: kl_coef * (1 - exp(ref - lp)).
    for b, t in [(0, 1), (1, 0)]:
        d = ref[b][t] - lp[b][t]
        assert g[b, t].item() == pytest.approx(cfg.kl_coef * (1 - math.exp(d)), abs=1e-7)


def test_truncated_importance_sampling_hand_example():
    """w = min(exp(old - engine), cap) multiplies the surrogate, not the KL, and carries no grad."""
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, tis_cap=2.0)
    lp = [[-1.0, -0.5, -0.7]]
    old = [[-1.1, -0.6, 9.0]]
    ref = [[-1.2, -0.4, 0.0]]
    engine = [[-1.6, -0.3, -50.0]]  # t0: w = e^0.5 = 1.6487; t1: w = e^-0.3 = 0.7408; t2 masked
    mask = [[1, 1, 0]]
    a = 1.5
    expected = 0.0
    weights = []
    for t in range(2):
        r = math.exp(lp[0][t] - old[0][t])  # e^0.1 inside the clip range for both tokens
        w = min(math.exp(old[0][t] - engine[0][t]), 2.0)
        weights.append(w)
        d = ref[0][t] - lp[0][t]
        expected += -w * r * a + 0.1 * (math.exp(d) - d - 1)
    assert weights == pytest.approx([1.6487213, 0.7408182], rel=1e-6)

    logprobs = torch.tensor(lp, requires_grad=True)
    args = (torch.tensor(old), torch.tensor(ref), torch.tensor([a]), torch.tensor(mask))
    loss, m = grpo_loss(logprobs, *args, cfg, engine_logprobs=torch.tensor(engine))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dlp of -w * exp(lp - old) * a is -w * r * a: w is a constant
    d0 = ref[0][0] - lp[0][0]
    grad0 = -weights[0] * math.exp(0.1) * a + 0.1 * (1 - math.exp(d0))
    assert logprobs.grad[0, 0].item() == pytest.approx(grad0, rel=1e-5)
    assert logprobs.grad[0, 2].item() == 0.0

    # the cap truncates: with cap 1.2, t0's weight is 1.2
    w = tis_weights(torch.tensor(old), torch.tensor(engine), torch.tensor(mask), cap=1.2)
    assert w[0].tolist() == pytest.approx([1.2, 0.7408182, 1.0], rel=1e-6)
    metrics = tis_metrics(w, torch.tensor(mask), cap=1.2)
    assert metrics["tis/weight_max"] == pytest.approx(1.2)
    assert metrics["tis/weight_mean"] == pytest.approx((1.2 + 0.7408182) / 2, rel=1e-6)
    assert metrics["tis/clipped_fraction"] == 0.5

    # off (None) is the plain loss; on without engine logprobs is an error
    plain, _ = grpo_loss(logprobs, *args, GRPOLossConfig(kl_coef=0.1))
    assert plain.item() != pytest.approx(loss.item())
    with pytest.raises(ValueError, match="engine"):
        grpo_loss(logprobs, *args, cfg)
    with pytest.raises(ValueError, match="tis_cap"):
        GRPOLossConfig(tis_cap=0.0)


def test_grpo_loss_at_ratio_one():
    """Policy = old = reference: no KL, no clipping, and the loss is minus the summed advantages."""
    cfg = GRPOLossConfig(kl_coef=0.5)
    g = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(8, 6, generator=g) * 3).requires_grad_()
    adv = torch.randn(8, generator=g)
    mask = (torch.arange(6) < torch.randint(1, 7, (8,), generator=g)[:, None]).float()
    same = logprobs.detach().clone()
    loss, m = grpo_loss(logprobs, same, same, adv, mask, cfg)
    adv_tokens = adv[:, None].expand_as(mask)
    torch.testing.assert_close(loss, -(adv_tokens * mask).sum(), rtol=0, atol=1e-5)
    assert m["kl"].item() == 0.0
    assert m["clip_fraction"].item() == 0
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv_tokens * mask, rtol=0, atol=1e-7)
