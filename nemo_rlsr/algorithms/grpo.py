"""GRPO core: group-normalised advantages and the clipped policy loss.

Everything here is a pure function of tensors and masks. The loss is a
*sum* over a micro-batch's valid tokens; the policy (models/policy.py)
divides the gradients by the valid-token count of the whole step, over
every micro-batch and data-parallel rank, so the objective is the step's
token mean however the batch is split (tests/test_parallel_equivalence.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Groups whose reward std is at or below this carry no learning signal.
ZERO_STD = 1e-8


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Per-sample advantage ``(r - mean_g) / (std_g + eps)`` within each group.

    ``rewards`` is ``[N]`` laid out group-contiguously: prompt ``i``'s samples
    are rows ``i*group_size .. (i+1)*group_size - 1``.  ``std_g`` is the
    *unbiased* sample std (Bessel's correction, torch's default), as in the
    GRPO paper's reference implementation.  A group whose std is at most 1e-8
    (all rewards equal, up to float noise) gets advantage exactly 0: dividing
    noise by ``eps`` would otherwise turn it into a large, meaningless
    signal.  ``group_size == 1`` has an undefined (NaN) std and is likewise 0.
    """
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} cannot be split into "
            f"groups of {group_size}"
        )
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased
    adv = (grouped - mean) / (std + eps)
    # `~(std > t)` is also True for NaN std (group_size == 1).
    adv = torch.where(~(std > ZERO_STD), torch.zeros_like(adv), adv)
    return adv.view(-1)


@dataclass(frozen=True)
class GRPOLossConfig:
    """Asymmetric PPO clip range (DAPO "clip-higher"), k3-KL weight, and the truncated
    importance-sampling cap (`tis_cap: None` turns the correction off; see :func:`tis_weights`)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.001
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 (or None to disable), got {self.tis_cap}")


def tis_weights(old_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights ``min(exp(old - engine), cap)`` per token, no grad.

    The rollout engine samples from its own numerics (another kernel, another precision, FP8), not
    from the trainer's pi_old, so PPO's ratio, taken against pi_old, is off-policy by
    pi_old / pi_engine. Reweighting each token's surrogate by that ratio makes the gradient
    unbiased again; capping it (Yao et al. 2025, "truncated IS") trades a small bias for bounded
    variance when the engine gave a token far less mass than the trainer. Masked tokens get 1.
    """
    log_w = torch.where(mask.bool(), old_logprobs - engine_logprobs, 0.0)
    return log_w.exp().clamp(max=cap).detach()


def tis_metrics(weights: Tensor, mask: Tensor, cap: float) -> dict[str, float]:
    """Mean and max TIS weight over valid tokens, and the fraction of them the cap truncated."""
    valid = mask.bool()
    if not valid.any():
        return {"tis/weight_mean": 1.0, "tis/weight_max": 1.0, "tis/clipped_fraction": 0.0}
    values = weights[valid]
    return {"tis/weight_mean": float(values.mean()), "tis/weight_max": float(values.max()),
            "tis/clipped_fraction": float((values >= cap).float().mean())}


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: GRPOLossConfig,
    engine_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate plus k3 KL penalty, summed over the valid tokens.

    Shapes: ``logprobs``/``old_logprobs``/``ref_logprobs``/``mask`` are
    ``[B, T]`` token log-probs of the sampled tokens; ``mask`` is binary
    (non-zero = response token that counts); ``advantages`` is ``[B]`` and
    is broadcast over each sequence's tokens.

    Per token, with ``ratio = exp(logprobs - old_logprobs)``::

        surrogate = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        kl        = exp(ref - logp) - (ref - logp) - 1      # Schulman's k3
        per_token = w * surrogate + kl_coef * kl

    ``w`` is 1, or with ``cfg.tis_cap`` set the truncated IS weight
    ``min(exp(old_logprobs - engine_logprobs), tis_cap)`` (:func:`tis_weights`;
    ``engine_logprobs`` are the rollout engine's logprobs of the sampled tokens).
    k3 is >= 0 per token and unbiased for KL(pi || ref) under samples from pi.

    Aggregation: ``loss = sum(per_token * mask)``.  The caller divides by the
    number of valid tokens in the *whole step's* batch, across all
    micro-batches and all DP ranks (MegatronPolicy.train_step does, through
    megatron's per-token loss scaling), which gives the token mean of the full
    batch however it was split; dividing by a per-micro-batch count instead
    would weight tokens of short micro-batches more.

    Returns ``(loss, metrics)``.  Metrics are detached *sums* over this
    micro-batch's valid tokens too, which the caller all-reduces (sum) and
    divides by the same global count:
    ``clip_fraction`` (number of tokens where the clip changed the objective,
    i.e. ratio outside ``[1-clip_low, 1+clip_high]`` on the side where the
    clipped branch wins the min, so those tokens get no gradient), ``kl``
    (sum of k3), ``ratio`` (sum of ratios), ``pg_loss`` (sum of the, possibly
    IS-weighted, surrogate).
    """
    valid = mask.bool()
    adv = advantages.unsqueeze(-1)
    # Zero the exponent on masked tokens *before* exp: padding may hold
    # arbitrary values, and inf there would turn 0-weighted terms into NaN
    # in both the forward sum and the backward pass.
    log_ratio = torch.where(valid, logprobs - old_logprobs, 0.0)
    ref_log_ratio = torch.where(valid, ref_logprobs - logprobs, 0.0)

    ratio = log_ratio.exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * adv
    surrogate = -torch.minimum(unclipped, clipped)
    if cfg.tis_cap is not None:
        if engine_logprobs is None:
            raise ValueError("tis_cap is set: grpo_loss needs the engine's logprobs")
        surrogate = tis_weights(old_logprobs, engine_logprobs, mask, cfg.tis_cap) * surrogate
    kl = ref_log_ratio.exp() - ref_log_ratio - 1.0
    per_token = surrogate + cfg.kl_coef * kl

    def masked_sum(x: Tensor) -> Tensor:
        return torch.where(valid, x, 0.0).sum()

    loss = masked_sum(per_token)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_sum((clipped < unclipped).float()),
            "kl": masked_sum(kl),
            "ratio": masked_sum(ratio),
            "pg_loss": masked_sum(surrogate),
        }
    return loss, metrics
