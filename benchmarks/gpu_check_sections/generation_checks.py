"""Section `torch_sampler`: our KV-cache sampler (generation/torch_sampler.py) on the check's device.

* greedy tokens = the argmax of the policy's teacher-forced logits over the same sequence (a full
  forward without KV cache). A near-tie can flip under other kernels (incremental decode vs one
  full forward); a mismatch only counts when the chosen token's logit is below the argmax's by
  more than float noise;
* its logprobs at temperature T = the policy's (MegatronPolicy at the same T) on the sampled
  tokens: token_mult_prob_error = exp(mean |diff|), as the trainer logs it;
* the same seed gives the same samples, another seed others;
* no padded vocabulary id is ever drawn, even at a high temperature.

The checks shared with the megatron engine section (seeds, padded ids, logprob agreement) are
functions of a RolloutBatch here, so both engines are held to the same rules.
"""

from __future__ import annotations

import torch

from . import fixtures as fx
from .options import Options
from .record import SectionRecord, timed

TIE_TOLERANCE = 1e-4  # fp32 logits: two kernels' rounding differs by ~1e-6
MULT_PROB_TOL = 1.001  # the trainer's CPU tests hold both engines of one fp32 module to this
TEMPERATURE = 0.7
HOT_TEMPERATURE = 2.0  # flattens the distribution: padded ids would be drawn if they were not masked


def greedy_mismatches(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, float]:
    """(positions where the target is not the argmax, of those beyond the tie tolerance, largest
    logit gap) over the masked positions."""
    logits, targets = logits[mask.bool()], targets[mask.bool()]
    gap = logits.max(dim=-1).values - logits.gather(-1, targets[:, None]).squeeze(-1)
    differs = logits.argmax(dim=-1) != targets
    real = differs & (gap > TIE_TOLERANCE * max(1.0, float(logits.abs().max())))
    return int(differs.sum()), int(real.sum()), float(gap.max()) if gap.numel() else 0.0


def check_logprobs_match_policy(rec: SectionRecord, name: str, policy, rollouts, temperature: float) -> None:
    """The engine's logprobs vs MegatronPolicy.logprobs at `temperature` (and at 1.0, to tell a
    missing temperature apart from other errors) on the sampled tokens. Padded vocabulary ids
    (which `check_no_padded_vocab_id` fails on) are left out: the policy gives them probability 0."""
    batch = rollouts.to_token_batch()
    padded = rollouts.response_mask.bool() & (batch.targets >= policy.vocab_size)
    mask = rollouts.response_mask * ~padded
    rec.metric(f"{name}_padded_ids_left_out", int(padded.sum()))
    errors = {}
    for t in sorted({temperature, 1.0}):
        errors[t] = fx.token_mult_prob_error(policy.logprobs(batch, len(batch), temperature=t),
                                             rollouts.engine_logprobs, mask)
    rec.metric(f"{name}_token_mult_prob_error", {f"policy_at_T={t}": e for t, e in errors.items()})
    rec.check(name, errors[temperature] < MULT_PROB_TOL,
              f"token_mult_prob_error vs policy at T={temperature}: {errors[temperature]:.6f} < {MULT_PROB_TOL} "
              f"(vs T=1.0: {errors[1.0]:.6f})")


def check_seeds(rec: SectionRecord, generate) -> None:
    """`generate(seed)` -> RolloutBatch: equal for equal seeds, different for different ones."""
    first, again, other = generate(1), generate(1), generate(2)
    rec.check("same_seed_same_samples", first.response_ids == again.response_ids)
    rec.check("different_seeds_differ", first.response_ids != other.response_ids)


def check_no_padded_vocab_id(rec: SectionRecord, rollouts, vocab: int) -> None:
    drawn = [t for ids in rollouts.response_ids for t in ids]
    bad = sum(t >= vocab for t in drawn)
    rec.check("no_padded_vocab_id", bad == 0 and len(drawn) > 0,
              f"{bad} of {len(drawn)} tokens sampled at T={HOT_TEMPERATURE} are >= the true vocabulary {vocab}")


def torch_sampler(rec: SectionRecord, opts: Options) -> None:
    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
    from nemo_rlsr.models.policy import MegatronPolicy

    s = fx.shape(opts.smoke)
    ctx = fx.start_megatron()
    policy = MegatronPolicy(s.model, None, s.vocab, ctx)
    fx.randomize_norms(policy.module)
    rec.metric("policy", fx.describe(policy))
    engine = TorchRolloutEngine(policy.module, fx.PAD, fx.EOS, s.vocab)
    prompts = fx.random_prompts(s, seed=10)

    greedy_params = SamplingParams(max_new_tokens=s.new_tokens, greedy=True, stop_on_eos=False)
    seconds, greedy = timed(lambda: engine.generate(prompts, greedy_params, seed=0), warmup=1)
    rec.metric("greedy_tokens_per_s", len(prompts) * s.new_tokens / seconds)
    batch = greedy.to_token_batch()
    differs, real, gap = greedy_mismatches(fx.model_logits(policy.module, batch, s.vocab), batch.targets,
                                           greedy.response_mask)
    rec.metric("greedy_vs_teacher_forced", {"tokens": int(greedy.response_mask.sum()), "argmax_differs": differs,
                                            "beyond_tie_tolerance": real, "largest_gap_to_argmax": gap})
    rec.check("greedy_equals_teacher_forced_argmax", real == 0,
              f"{real} of {int(greedy.response_mask.sum())} greedy tokens are not the argmax "
              f"({differs} incl. near-ties)")

    sampling = SamplingParams(max_new_tokens=s.new_tokens, temperature=TEMPERATURE, n=s.group)
    seconds, sampled = timed(lambda: engine.generate(prompts, sampling, seed=5))
    rec.metric("sampled_tokens_per_s", float(sampled.response_mask.sum()) / seconds)
    check_logprobs_match_policy(rec, "logprobs_match_policy_at_T", policy, sampled, TEMPERATURE)
    check_seeds(rec, lambda seed: engine.generate(prompts, sampling, seed=seed))
    hot = SamplingParams(max_new_tokens=s.new_tokens, temperature=HOT_TEMPERATURE, n=s.group, stop_on_eos=False)
    check_no_padded_vocab_id(rec, engine.generate(prompts, hot, seed=7), s.vocab)
