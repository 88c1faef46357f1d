"""Per-step statistics of an RLSR step's rollouts and rewards, over every data-parallel rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_rlsr.models.policy import TokenBatch
from nemo_rlsr.rewards.diagnostics import length_ratios, reward_diagnostics, tied_group_fraction
from nemo_rlsr.rewards.result import RewardResult
from nemo_rlsr.rewards.terms import TermValues


def gather_over_dp(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate a 1-D tensor from every data-parallel rank (same length on each), on `device`
    (the policy's). NCCL gathers device tensors only, and rewards arrive in host memory (the
    encoders return them there), so they are moved first; at DP=1 too, so that the result can
    meet other device tensors."""
    from megatron.core import parallel_state

    values = values.to(device)
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, values.contiguous(), group=group)
    return torch.cat(parts)


def rollout_metrics(batch: TokenBatch, truncated: torch.Tensor, scores: RewardResult,
                    device: torch.device) -> dict[str, float]:
    """Reward and response statistics over every DP rank's rollouts, from the step's batch (on the
    policy's `device`, its loss mask = the rollouts' response mask, its extras holding the engine's
    and the policy's logprobs of the sampled tokens) and the host rewards."""
    rewards = gather_over_dp(scores.rewards, device)
    mask = batch.loss_mask
    lengths = gather_over_dp(mask.sum(dim=1), device)
    mismatch = ((batch.extras["engine_logprobs"] - batch.extras["old_logprobs"]).abs() * mask).sum()
    mismatch = mismatch / mask.sum().clamp(min=1)
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "reward/min": float(rewards.min()),
        "reward/max": float(rewards.max()),
        "reward/fraction_penalized": float(gather_over_dp(scores.penalized.float(), device).mean()),
        "response/mean_length": float(lengths.mean()),
        "response/truncated_fraction": float(gather_over_dp(truncated.float(), device).mean()),
        "token_mult_prob_error": float(torch.exp(mismatch)),
    }
    # Reward-hacking diagnostics over every rank's rollouts (cosine histogram, empty, length corr, ...).
    metrics.update(reward_diagnostics(scores.map(lambda t: gather_over_dp(t.float(), device)), lengths))
    return metrics


def reward_term_metrics(terms: TermValues, rewards: torch.Tensor, responses: list[str], references: list[str],
                        group_size: int, device: torch.device) -> dict[str, float]:
    """Each reward term's mean and std (weight-0 terms too), and the reward-hacking signals that
    span terms, over every DP rank's rollouts (each rank's rows are whole groups)."""
    metrics = {}
    for k, name in enumerate(terms.names):
        values = gather_over_dp(terms.values[:, k].contiguous(), device).double()
        metrics[f"reward/term/{name}/mean"] = float(values.mean())
        metrics[f"reward/term/{name}/std"] = float(values.std()) if values.numel() > 1 else 0.0
    metrics["reward/tied_group_fraction"] = tied_group_fraction(gather_over_dp(rewards, device), group_size)
    metrics["reward/length_ratio_to_reference"] = float(
        gather_over_dp(length_ratios(responses, references), device).mean())
    return metrics
