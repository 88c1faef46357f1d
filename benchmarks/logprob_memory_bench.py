"""Peak memory of the logprob + loss step: the whole-micro-batch log-softmax it replaced vs the chunked one.

    python benchmarks/logprob_memory_bench.py                       # T=4096, vocab 152064, hidden 64 (~15 GB peak before)
    python benchmarks/logprob_memory_bench.py --tokens 1024 --vocab 32768   # a smaller run

One `MegatronPolicy.train_step` (forward + backward + optimizer, GRPO loss with the entropy metric,
as the RLSR trainer runs it) of a one-layer policy with a small hidden size, so that the
vocabulary-sized tensors of the loss dominate, on one micro-batch of `--tokens` tokens. Measured
exactly as the planner's memory test measures (tests/memory_probe.py: live tensor storage after a
warm-up step, plus the largest running sum of the allocator's events that torch.profiler records
during a second step), each variant in a fresh process:

- `before`: the loss path before chunking (`whole_batch_logprobs` below, kept here only as this
  baseline): fp32 logits / temperature, the entropy metric's exp and product, and megatron's
  vocab_parallel_cross_entropy, which keeps the softmax for backward, all over the whole micro-batch;
- `after`: nemo_rlsr.models.logprobs.token_logprobs with `model.logprob_chunk_tokens` (--chunk).

Prints one JSON line per variant, then the ratio and the planner's prediction for the same step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def whole_batch_logprobs(logits, targets, temperature, true_vocab_size, chunk_tokens, with_entropy):
    """The baseline: what the loss computed before models/logprobs.py (chunk_tokens is ignored)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_rlsr.models.gpt import mask_padded_vocab

    logits = mask_padded_vocab(logits.float() / temperature, true_vocab_size)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            group = parallel_state.get_tensor_model_parallel_group()
            top = logits.max(dim=-1, keepdim=True).values
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            shifted = logits - top
            exp = shifted.exp()
            sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
            dist.all_reduce(sums, group=group)
            entropy = sums[0].log() - sums[1] / sums[0]
    return -vocab_parallel_cross_entropy(logits, targets), entropy


def overrides(args) -> list[str]:
    return ["model.num_layers=1", f"model.hidden_size={args.hidden}", "model.num_attention_heads=2",
            f"model.ffn_hidden_size={4 * args.hidden}", f"model.max_sequence_length={args.tokens}",
            f"model.vocab_size={args.vocab}", "model.tie_embeddings=false", f"model.logprob_chunk_tokens={args.chunk}",
            "grpo.prompts_per_step=1", "grpo.num_generations=2", "grpo.mini_batches_per_step=2",
            "grpo.micro_batch_size=1"]


def measure(variant: str, args) -> dict:
    """One variant in this process (called in a fresh subprocess by main)."""
    sys.path.insert(0, str(REPO / "tests"))
    import memory_probe

    import nemo_rlsr.models.policy as policy_module

    if variant == "before":
        policy_module.token_logprobs = whole_batch_logprobs
    start = time.perf_counter()
    result = memory_probe.measure(str(REPO / "conf/rlsr_tiny.yaml"), overrides(args))
    return {"variant": variant, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
            "chunk": args.chunk if variant == "after" else None, "peak_gib": result["peak"] / 2**30,
            "persistent_gib": result["base"] / 2**30, "step_gib": result["increase"] / 2**30,
            "seconds_for_3_steps": round(time.perf_counter() - start, 1)}


def predicted_gib(args) -> float:
    from nemo_rlsr.config import load_config
    from nemo_rlsr.planner import make_plan

    plan = make_plan(load_config(REPO / "conf/rlsr_tiny.yaml", overrides(args)))
    return sum(plan.memory.items[k] for k in ("weights", "grads", "optimizer", "activations")) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--variant", choices=["before", "after"], help=argparse.SUPPRESS)  # one variant, in-process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)), flush=True)
        return
    peaks = {}
    for variant in ("before", "after"):
        run = subprocess.run([sys.executable, __file__, "--variant", variant, *sys.argv[1:]],
                             capture_output=True, text=True, cwd=REPO)
        if run.returncode:
            sys.exit(f"{variant}: exit {run.returncode}\n{run.stderr[-3000:]}")
        line = next(line for line in run.stdout.splitlines() if line.startswith("{"))
        print(line, flush=True)
        peaks[variant] = json.loads(line)["peak_gib"]
    print(f"peak of the logprob + loss step at T={args.tokens}, vocab {args.vocab}, hidden {args.hidden}: "
          f"before {peaks['before']:.2f} GiB, after {peaks['after']:.2f} GiB (chunk {args.chunk} tokens): "
          f"{peaks['before'] / peaks['after']:.2f}x lower; planner predicts {predicted_gib(args):.2f} GiB after")


if __name__ == "__main__":
    main()
