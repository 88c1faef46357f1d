"""Token-budget micro-batches against fixed ones on a realistic rollout length mix, same run.

    python benchmarks/microbatch_bench.py                       # 32 rows up to 4096 tokens, CPU (~5 min)
    python benchmarks/microbatch_bench.py --rows 8 --max-len 256 --steps 1   # smoke (CI)

The batch has the rollouts' layout ([left pad | prompt | response | right pad], every prompt
ending in the same column): prompt lengths uniform in [--min-prompt, --max-prompt], response
lengths long-tailed (log-normal, median --median-response, sigma --sigma; defaults scale with
--max-len: prompts 64-512 and median response 614 at 4096), cut at --max-len in all,
like RLSR's 4096-token cap, where a few responses run to the cap and most stop far earlier. The
batch is as wide as its longest row. One tiny policy (two twins from the same seed) runs, per
variant, the step the trainer runs: the policy and reference logprob passes (forward-only) and the
GRPO train step, alternating fixed (--micro-batch-size rows at the batch's width) and token budget
(--max-tokens, default micro-batch-size x max-len: the same worst-case activation memory), so both
see the same machine load. Printed per variant: micro-batches, padded-token fraction (computed
positions that are not tokens: pads and fillers), median step time; then the ratios, and the
loss / grad-norm differences (the two must train alike: |diff| <= 1e-6 is what the tests require).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rollout_lengths(args, generator) -> list[tuple[int, int]]:
    """(prompt, response) token counts, response log-normal and cut so that the row fits --max-len."""
    import torch

    out = []
    for _ in range(args.rows):
        prompt = int(torch.randint(args.min_prompt, args.max_prompt + 1, (1,), generator=generator))
        draw = float(torch.randn(1, generator=generator)) * args.sigma
        response = int(args.median_response * torch.tensor(draw).exp())
        out.append((prompt, max(1, min(response, args.max_len - args.max_prompt))))
    return out


def rollout_batch(args, vocab: int):
    import torch

    from nemo_rlsr.models.policy import TokenBatch

    g = torch.Generator().manual_seed(args.seed)
    lengths = rollout_lengths(args, g)
    width = args.max_prompt + max(r for _, r in lengths)
    ids = torch.zeros(args.rows, width, dtype=torch.long)
    valid = torch.zeros(args.rows, width, dtype=torch.bool)
    loss_mask = torch.zeros(args.rows, width)
    for row, (prompt, response) in enumerate(lengths):
        start, end = args.max_prompt - prompt, args.max_prompt + response
        ids[row, start:end] = torch.randint(1, vocab, (end - start,), generator=g)
        valid[row, start:end] = True
        loss_mask[row, args.max_prompt - 1 : end - 1] = 1.0
    extras = {"advantages": torch.randn(args.rows, generator=g)}
    return TokenBatch(ids, valid, loss_mask, extras), lengths


def one_step(policy, batch, args, max_tokens, loss_fn) -> tuple[float, dict]:
    """The trainer's step on `batch`: old and reference logprobs (forward-only), then the update."""
    start = time.perf_counter()
    old = policy.logprobs(batch, args.micro_batch_size, 1.0, max_tokens)
    ref = policy.logprobs(batch, args.micro_batch_size, 1.0, max_tokens)
    batch.extras["old_logprobs"], batch.extras["ref_logprobs"] = old, ref
    metrics = policy.train_step(batch, args.micro_batch_size, loss_fn, max_tokens=max_tokens)
    return time.perf_counter() - start, metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--min-prompt", type=int, default=0, help="0: max-len / 64 (64 at 4096)")
    parser.add_argument("--max-prompt", type=int, default=0, help="0: max-len / 8 (512 at 4096)")
    parser.add_argument("--median-response", type=float, default=0.0, help="0: max-len x 0.15 (614 at 4096)")
    parser.add_argument("--sigma", type=float, default=0.9)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=0, help="token budget; 0: micro-batch-size x max-len")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (alternating, after one untimed)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.max_prompt = args.max_prompt or args.max_len // 8
    args.min_prompt = min(args.min_prompt or args.max_len // 64, args.max_prompt)
    args.median_response = args.median_response or 0.15 * args.max_len
    budget = args.max_tokens or args.micro_batch_size * args.max_len

    import torch

    from nemo_rlsr.algorithms.grpo import GRPOLossConfig
    from nemo_rlsr.config import ModelConfig, OptimizerConfig
    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import destroy_distributed, init_distributed
    from nemo_rlsr.models.microbatches import agree_across_ranks, padded_fraction, plan_micro_batches
    from nemo_rlsr.models.policy import MegatronPolicy, pad_sequence_length
    from nemo_rlsr.trainer.rlsr import grpo_loss_fn

    vocab = 512
    model = ModelConfig(num_layers=2, hidden_size=args.hidden, num_attention_heads=2, ffn_hidden_size=2 * args.hidden,
                        max_sequence_length=args.max_len)
    ctx = init_distributed(ParallelDims(seed=1))
    policies = {}
    for name in ("fixed", "token budget"):
        torch.manual_seed(0)
        policies[name] = MegatronPolicy(model, OptimizerConfig(lr=1e-4), vocab, ctx)
    batch, lengths = rollout_batch(args, vocab)
    rows = args.rows - args.rows % args.micro_batch_size
    batch = batch.slice(0, rows)
    budgets = {"fixed": None, "token budget": budget}
    loss_fn = grpo_loss_fn(GRPOLossConfig())

    result: dict = {"rows": rows, "batch_width": batch.input_ids.shape[1], "max_len": args.max_len,
                    "micro_batch_size": args.micro_batch_size, "max_tokens_per_microbatch": budget,
                    "tokens": int(batch.valid.sum()),
                    "response_tokens": {"median": statistics.median(r for _, r in lengths[:rows]),
                                        "max": max(r for _, r in lengths[:rows])}}
    padded = pad_sequence_length(batch, policies["fixed"].sequence_multiple)
    times: dict[str, list[float]] = {name: [] for name in budgets}
    metrics: dict[str, dict] = {}
    for name, max_tokens in budgets.items():
        micro = agree_across_ranks(plan_micro_batches(padded, args.micro_batch_size, max_tokens,
                                                      policies[name].sequence_multiple), padded, 1, None)
        result[name] = {"micro_batches": len(micro), "padded_fraction": padded_fraction(micro)}
    for step in range(args.steps + 1):  # step 0 warms up (first-call allocations, lazy imports)
        for name, max_tokens in budgets.items():
            seconds, metrics[name] = one_step(policies[name], batch.slice(0, rows), args, max_tokens, loss_fn)
            if step:
                times[name].append(seconds)
    for name in budgets:
        result[name]["step_s"] = statistics.median(times[name])
        print(f"{name:>12}: {result[name]['micro_batches']:3d} micro-batches, padded-token fraction "
              f"{result[name]['padded_fraction']:.3f}, step {result[name]['step_s']:.2f} s (median of {args.steps})")
    fixed, tokenwise = result["fixed"], result["token budget"]
    result["step_time_ratio"] = tokenwise["step_s"] / fixed["step_s"]
    result["padded_fraction_ratio"] = tokenwise["padded_fraction"] / max(fixed["padded_fraction"], 1e-12)
    result["loss_abs_diff"] = abs(metrics["fixed"]["loss"] - metrics["token budget"]["loss"])
    result["grad_norm_abs_diff"] = abs(metrics["fixed"]["grad_norm"] - metrics["token budget"]["grad_norm"])
    print(f"step time, token budget / fixed: {result['step_time_ratio']:.3f}; padded-token fraction "
          f"{tokenwise['padded_fraction']:.3f} vs {fixed['padded_fraction']:.3f}")
    print(f"last step: |loss diff| {result['loss_abs_diff']:.2e}, |grad-norm diff| {result['grad_norm_abs_diff']:.2e}")
    print(json.dumps(result))
    destroy_distributed()
    return result


if __name__ == "__main__":
    main()
