"""Section `megatron_engine`: megatron-core's inference engine through our adapter (on CUDA, and in smoke
mode on the CPU through cpu_compat; generation/megatron_engine.py), held to the behaviour every RolloutEngine documents
(generation/interface.py):

* EOS: a response that ends on EOS keeps it (in `response_ids`, `response_mask`, `valid`) and is
  marked finished (`truncated` False); with `stop_on_eos=False` generation goes past it. To be
  sure the model emits "EOS", the token that a free greedy run emits third (in its first row of
  3 tokens or more) is declared EOS (the model is random: nothing else guarantees an EOS);
* greedy tokens = our torch sampler's on the same module (a row may part at a near-tie only);
* the same seed gives the same samples, another seed others;
* logprobs at temperature T = the policy's at T (token_mult_prob_error ~ 1);
* no torch InferenceMode is left active after `generate`: a training step right after works;
* no padded vocabulary id is ever drawn.

Each of these is its own sub-check: one that raises is recorded and the next one still runs.
"""

from __future__ import annotations

import math

import torch

from . import fixtures as fx
from .generation_checks import (
    HOT_TEMPERATURE,
    TEMPERATURE,
    TIE_TOLERANCE,
    check_logprobs_match_policy,
    check_no_padded_vocab_id,
    check_seeds,
)
from .options import Options
from .record import SectionRecord, timed


def expected_cut(tokens: list[int], eos: int) -> list[int]:
    """`tokens` up to and including the first `eos` (all of them when there is none)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def check_greedy_matches(rec: SectionRecord, prompts, ours, logits: torch.Tensor, theirs) -> None:
    """Greedy `theirs` vs `ours` (the torch sampler's greedy rollouts, whose teacher-forced `logits`
    are given): a row may differ only where its first differing token is a near-tie under those
    logits (after that token the contexts differ, and nothing more is comparable)."""
    prompt_len = max(len(p) for p in prompts)
    identical, ties, real = 0, 0, []
    for row, (a, b) in enumerate(zip(ours.response_ids, theirs.response_ids)):
        if a == b:
            identical += 1
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        scores = logits[row, prompt_len - 1 + k] if k < min(len(a), len(b)) and b[k] < logits.shape[-1] else None
        if scores is not None and scores.max() - scores[b[k]] <= TIE_TOLERANCE * max(1.0, float(scores.abs().max())):
            ties += 1
        else:
            real.append(row)
    rec.metric("greedy_vs_torch_sampler", {"rows": len(prompts), "identical": identical, "near_tie_divergences": ties,
                                           "real_divergences": len(real)})
    rec.check("greedy_equals_torch_sampler", not real,
              f"{identical} of {len(prompts)} rows identical, {ties} diverge at a near-tie, rows {real[:8]} do not")


def check_eos(rec: SectionRecord, engine_for, prompts, s: fx.Shape) -> None:
    from nemo_rlsr.generation.interface import SamplingParams

    free = engine_for(fx.EOS).generate(prompts, SamplingParams(s.new_tokens, greedy=True, stop_on_eos=False), seed=0)
    row = next((i for i, r in enumerate(free.response_ids) if len(r) >= 3), None)
    if row is None:
        raise AssertionError(f"no row of a free greedy run has 3 tokens: {free.response_ids}")
    eos = free.response_ids[row][2]
    rec.metric("declared_eos", {"token": eos, "emitted_third_in_row": row})
    kept_going = engine_for(eos).generate(prompts, SamplingParams(s.new_tokens, greedy=True, stop_on_eos=False), seed=0)
    went_on = kept_going.response_ids[row]
    rec.check("stop_on_eos_false_continues_past_eos",
              kept_going.response_ids == free.response_ids
              and all(len(r) == s.new_tokens for r in kept_going.response_ids),
              f"row {row}: {went_on[:6]}... ({len(went_on)} tokens, EOS {eos})")
    stopped = engine_for(eos).generate(prompts, SamplingParams(s.new_tokens, greedy=True), seed=0)
    expected = [expected_cut(r, eos) for r in free.response_ids]
    rec.check("eos_kept_in_response", stopped.response_ids == expected,
              f"row {row}: got {stopped.response_ids[row]}, expected {expected[row]}")
    lengths = stopped.response_mask.sum(dim=1).long().tolist()
    wanted = [len(r) for r in expected]
    rec.check("response_mask_counts_eos", lengths == wanted, f"response_mask sums {lengths[:4]} vs {wanted[:4]}")
    finished = (~stopped.truncated).tolist()
    rec.check("finished_set_on_eos", finished == [eos in r for r in free.response_ids],
              f"finished {finished[:8]}")


def check_training_after_generate(rec: SectionRecord, policy, rollouts) -> None:
    """A forward + backward + optimizer step right after `generate` must train: an InferenceMode
    left active makes megatron's step a silent no-op (seen on the CPU: grad norm 0, weights
    unchanged, no error), and inference tensors cached by the engine make autograd refuse."""
    from nemo_rlsr.algorithms.grpo import GRPOLossConfig
    from nemo_rlsr.trainer.rlsr import grpo_loss_fn

    rec.check("no_inference_mode_left", not torch.is_inference_mode_enabled(),
              f"torch.is_inference_mode_enabled() = {torch.is_inference_mode_enabled()}")
    advantages = torch.randn(len(rollouts.response_ids), device=rollouts.input_ids.device)
    batch = rollouts.to_token_batch(advantages=advantages)
    old = policy.logprobs(batch, len(batch))
    batch.extras |= {"old_logprobs": old, "ref_logprobs": old}
    before = [p.detach().clone() for p in policy.module.parameters()]
    metrics = policy.train_step(batch, len(batch), grpo_loss_fn(GRPOLossConfig()), skip_nonfinite=True)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(policy.module.parameters(), before))
    rec.metric("train_step_after_generate", {**metrics, "max_weight_change": moved})
    rec.check("train_step_after_generate", math.isfinite(metrics["loss"]) and metrics["nonfinite"] == 0.0
              and 0 < metrics["grad_norm"] < math.inf and moved > 0,
              f"loss {metrics['loss']}, grad_norm {metrics['grad_norm']}, max |weight change| {moved:.2e}")


def megatron_engine(rec: SectionRecord, opts: Options) -> None:
    from nemo_rlsr.config import OptimizerConfig
    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.megatron_engine import MegatronRolloutEngine
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
    from nemo_rlsr.models.policy import MegatronPolicy

    s = fx.shape(opts.smoke)
    ctx = fx.start_megatron()
    policy = MegatronPolicy(s.model, OptimizerConfig(lr=1e-5), s.vocab, ctx)
    fx.randomize_norms(policy.module)
    rec.metric("policy", fx.describe(policy))
    prompts = fx.random_prompts(s, seed=20)

    def engine_for(eos: int) -> MegatronRolloutEngine:
        return MegatronRolloutEngine(policy.module, fx.PAD, eos, s.vocab, max_batch_size=s.rows,
                                     max_sequence_length=s.model.max_sequence_length)

    def greedy_equals_torch_sampler() -> None:
        params = SamplingParams(s.new_tokens, greedy=True, stop_on_eos=False)
        ours = TorchRolloutEngine(policy.module, fx.PAD, fx.EOS, s.vocab).generate(prompts, params, seed=0)
        logits = fx.model_logits(policy.module, ours.to_token_batch(), s.vocab)  # before the engine runs the module
        check_greedy_matches(rec, prompts, ours, logits, engine_for(fx.EOS).generate(prompts, params, seed=0))

    rec.attempt("greedy_equals_torch_sampler", greedy_equals_torch_sampler)
    rec.attempt("eos_kept_in_response", lambda: check_eos(rec, engine_for, prompts, s))

    sampling = SamplingParams(s.new_tokens, temperature=TEMPERATURE, n=s.group)
    engine = engine_for(fx.EOS)
    sampled = rec.attempt("sampling_runs", lambda: timed(lambda: engine.generate(prompts, sampling, seed=5)))
    if sampled is not None:
        seconds, rollouts = sampled
        rec.metric("sampled_tokens_per_s", float(rollouts.response_mask.sum()) / seconds)
        name = "logprobs_match_policy_at_T"
        rec.attempt(name, lambda: check_logprobs_match_policy(rec, name, policy, rollouts, TEMPERATURE))
        rec.attempt("train_step_after_generate", lambda: check_training_after_generate(rec, policy, rollouts))
    rec.attempt("same_seed_same_samples",
                lambda: check_seeds(rec, lambda seed: engine.generate(prompts, sampling, seed=seed)))
    hot = SamplingParams(s.new_tokens, temperature=HOT_TEMPERATURE, n=s.group, stop_on_eos=False)
    rec.attempt("no_padded_vocab_id",
                lambda: check_no_padded_vocab_id(rec, engine.generate(prompts, hot, seed=7), s.vocab))
