"""Sections `train_step` and `bf16_vs_fp32`: MegatronPolicy on the check's device.

train_step: the RLSR path of one step (trainer.rlsr.grpo_loss_fn, the clipped GRPO surrogate + k3
KL, through megatron's schedule, DDP and optimizer) on a synthetic rollout batch, checked against
references computed without megatron's schedule: logprobs of one plain forward and of
transformers' Llama on the same weights, the GRPO loss computed directly from those logprobs, and
the gradient norm of a plain autograd pass.

bf16_vs_fp32: the same weights with `model.params_dtype` float32 and bfloat16. The bf16 error is
split in two: weights rounded to bf16 but computed in fp32, and bf16 compute on those same weights.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import fixtures as fx
from .options import Options
from .record import SectionRecord, timed

FP32_LOGPROB_TOL = 1e-4  # fp32 everywhere, one model, two code paths: float noise only
LOSS_REL_TOL = 1e-4
GRAD_NORM_REL_TOL = 1e-3
# bf16 has an 8-bit mantissa (relative rounding 2^-9 = 0.2%): logprobs of ~-8 nats move by a few
# hundredths. A mean far above this is a precision bug (an fp32 path left in bf16), not rounding.
BF16_MEAN_ABS_TOL = 0.05


def _rlsr_batch(s: fx.Shape, seed: int):
    from nemo_rlsr.algorithms.grpo import group_advantages

    rollouts = fx.synthetic_rollouts(s, seed)
    rewards = torch.rand(s.rows, generator=torch.Generator().manual_seed(seed + 2))
    advantages = group_advantages(rewards, s.group).to(rollouts.input_ids.device)
    return rollouts.to_token_batch(advantages=advantages)


def _grad_norm_by_autograd(policy, batch, vocab: int, loss_cfg) -> tuple[float, float]:
    """(token-mean GRPO loss, global gradient norm) of one plain forward + torch.autograd.grad:
    no megatron schedule, no DDP buffers (autograd.grad does not accumulate into them)."""
    from nemo_rlsr.algorithms.grpo import grpo_loss
    from nemo_rlsr.models.policy import attention_mask, position_ids

    module = policy.module
    module.train()
    logits = module(batch.input_ids, position_ids(batch.input_ids), attention_mask(batch.valid))
    logprobs = fx.logprobs_from_logits(logits[..., :vocab], batch.targets)
    loss, _ = grpo_loss(logprobs, batch.extras["old_logprobs"], batch.extras["ref_logprobs"],
                        batch.extras["advantages"], batch.loss_mask, loss_cfg)
    loss = loss / batch.loss_mask.sum()  # the token mean, as the policy's schedule divides
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return float(loss), float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))


def train_step(rec: SectionRecord, opts: Options) -> None:
    from nemo_rlsr.algorithms.grpo import GRPOLossConfig
    from nemo_rlsr.config import OptimizerConfig
    from nemo_rlsr.models.policy import MegatronPolicy
    from nemo_rlsr.trainer.rlsr import grpo_loss_fn

    s = fx.shape(opts.smoke)
    ctx = fx.start_megatron()
    policy = MegatronPolicy(s.model, OptimizerConfig(lr=1e-4, clip_grad=1.0), s.vocab, ctx)
    fx.randomize_norms(policy.module)
    rec.metric("policy", fx.describe(policy))
    rec.check("parameters_on_device", all(p.device.type == ctx.device.type for p in policy.module.parameters()),
              f"expected {ctx.device.type}")

    batch = _rlsr_batch(s, seed=0)
    mbs = len(batch) // 2
    rec.metric("batch", {"rows": len(batch), "columns": batch.input_ids.shape[1], "micro_batch_size": mbs,
                         "loss_tokens": int(batch.loss_mask.sum()), "valid_tokens": int(batch.valid.sum())})
    seconds, old = timed(lambda: policy.logprobs(batch, mbs), repeat=2, warmup=1)
    rec.metric("logprobs_s", seconds)
    mask = batch.loss_mask
    rec.check("logprobs_on_device", old.device.type == ctx.device.type, str(old.device))

    plain = fx.plain_logprobs(policy.module, batch, s.vocab)
    worst, mean = fx.masked_abs_diff(old, plain, mask)
    rec.metric("logprobs_vs_plain_forward", {"max_abs": worst, "mean_abs": mean})
    rec.check("logprobs_equal_plain_forward", worst < FP32_LOGPROB_TOL, f"max |diff| {worst:.2e} < {FP32_LOGPROB_TOL}")

    def versus_transformers() -> None:
        theirs = fx.hf_logprobs(fx.hf_llama(policy.module, s.model, s.vocab), batch)
        hf_worst, hf_mean = fx.masked_abs_diff(old, theirs, mask)
        rec.metric("logprobs_vs_transformers_llama", {"max_abs": hf_worst, "mean_abs": hf_mean})
        rec.check("logprobs_equal_transformers_llama", hf_worst < FP32_LOGPROB_TOL,
                  f"max |diff| {hf_worst:.2e} < {FP32_LOGPROB_TOL}")

    rec.attempt("logprobs_equal_transformers_llama", versus_transformers)

    g = torch.Generator().manual_seed(3)
    batch.extras["old_logprobs"] = old
    batch.extras["ref_logprobs"] = old - 0.05 * torch.rand(old.shape, generator=g).to(old.device)  # KL > 0
    loss_cfg = GRPOLossConfig()
    direct_loss, direct_norm = _grad_norm_by_autograd(policy, batch, s.vocab, loss_cfg)
    before = [p.detach().clone() for p in policy.module.parameters()]
    first_s, metrics = timed(lambda: policy.train_step(batch, mbs, grpo_loss_fn(loss_cfg), skip_nonfinite=True))
    rec.metric("first_step_s", first_s)
    rec.metric("step_metrics", metrics)
    loss, norm = metrics.get("loss", math.nan), metrics.get("grad_norm", math.nan)
    rec.check("loss_finite", math.isfinite(loss), f"loss {loss}")
    rec.check("grad_norm_finite_positive", math.isfinite(norm) and norm > 0, f"grad_norm {norm}")
    rec.check("update_applied", metrics.get("update_skipped") == 0.0 and metrics.get("nonfinite") == 0.0,
              f"update_skipped {metrics.get('update_skipped')}, nonfinite {metrics.get('nonfinite')}")
    rec.check("loss_equals_direct_grpo_loss", math.isclose(loss, direct_loss, rel_tol=LOSS_REL_TOL, abs_tol=1e-6),
              f"megatron {loss:.6g} vs direct {direct_loss:.6g}")
    rec.check("grad_norm_equals_plain_autograd", math.isclose(norm, direct_norm, rel_tol=GRAD_NORM_REL_TOL),
              f"megatron {norm:.6g} vs autograd {direct_norm:.6g}")
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(policy.module.parameters(), before))
    after = policy.logprobs(batch, mbs)
    rec.check("weights_and_logprobs_moved", moved > 0 and not torch.equal(after, old),
              f"max |weight change| {moved:.2e}")
    step_s, _ = timed(lambda: policy.train_step(batch, mbs, grpo_loss_fn(loss_cfg), skip_nonfinite=True))
    rec.metric("step_s", step_s)
    rec.metric("step_tokens_per_s", float(batch.valid.sum()) / step_s)


def bf16_vs_fp32(rec: SectionRecord, opts: Options) -> None:
    from nemo_rlsr.models.policy import MegatronPolicy

    s = fx.shape(opts.smoke)
    ctx = fx.start_megatron()
    fp32 = MegatronPolicy(s.model, None, s.vocab, ctx)
    fx.randomize_norms(fp32.module)
    bf16 = MegatronPolicy(dataclasses.replace(s.model, params_dtype="bfloat16"), None, s.vocab, ctx)
    fx.copy_weights(fp32.module, bf16.module)
    rounded = MegatronPolicy(s.model, None, s.vocab, ctx)  # fp32 compute on the bf16 weights
    fx.copy_weights(bf16.module, rounded.module)
    rec.metric("bf16_policy", fx.describe(bf16))
    rec.check("bf16_parameters", all(p.dtype == torch.bfloat16 for p in bf16.module.parameters()),
              str(sorted({str(p.dtype) for p in bf16.module.parameters()})))

    batch = fx.synthetic_rollouts(s, seed=4).to_token_batch()
    mask = batch.loss_mask
    results = {}
    for name, policy in (("fp32", fp32), ("bf16", bf16), ("fp32_on_bf16_weights", rounded)):
        seconds, results[name] = timed(lambda: policy.logprobs(batch, len(batch)), repeat=2, warmup=1)
        rec.metric(f"logprobs_s_{name}", seconds)
    rec.check("bf16_logprobs_finite", bool(torch.isfinite(results["bf16"][mask.bool()]).all()))
    for name, (a, b) in {"bf16_compute": (results["bf16"], results["fp32_on_bf16_weights"]),
                         "bf16_weights": (results["fp32_on_bf16_weights"], results["fp32"]),
                         "bf16_total": (results["bf16"], results["fp32"])}.items():
        worst, mean = fx.masked_abs_diff(a, b, mask)
        rec.metric(name, {"max_abs": worst, "mean_abs": mean,
                          "token_mult_prob_error": fx.token_mult_prob_error(a, b, mask)})
    compute = rec.metrics["bf16_compute"]
    # Nonzero: the bf16 model really computed in bf16 (else this compares fp32 with itself).
    rec.check("bf16_compute_error_small_but_nonzero", 0 < compute["mean_abs"] < BF16_MEAN_ABS_TOL,
              f"mean |diff| {compute['mean_abs']:.2e} in (0, {BF16_MEAN_ABS_TOL})")
    total = rec.metrics["bf16_total"]
    rec.check("bf16_total_error_small", total["mean_abs"] < BF16_MEAN_ABS_TOL,
              f"mean |diff| {total['mean_abs']:.2e} < {BF16_MEAN_ABS_TOL}")
