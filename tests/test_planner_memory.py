"""The planner's memory model against the measured peak of a real train_step on CPU.

tests/memory_probe.py runs `MegatronPolicy.train_step` of the tiny config (and a second, deeper and
narrower variant with smaller micro-batches) in a fresh process and measures its peak: live tensor
storage after a warm-up step (parameters, megatron's fp32 grad buffer, Adam's moments) plus the
maximum running sum of the CPU allocator's allocation and free events that torch.profiler records
during a second step. The planner's prediction for the same step is weights + grads + optimizer +
activations of its training phase (the frozen reference and the reward encoder are not part of a
train_step). Its activation model was derived by listing the tensors autograd saves
(`saved_tensors_hooks`) on the default tiny shape; the variants check it generalises, and three with a
16k vocabulary check the loss's model (the logits plus one chunk's fp32 temporaries, or the
logits' transposed copy), and two whose attention scores dominate check the s x s score memory of the
mask layout (what TE's `arbitrary` fallback materialises too) and of the local spec's THD stream.
"""

from __future__ import annotations

import json

import pytest

from cli_runner import REPO, run_python
from nemo_rlsr.config import load_config
from nemo_rlsr.planner import make_plan

VARIANTS = [
    [],
    ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=2", "model.ffn_hidden_size=256",
     "model.max_sequence_length=40", "grpo.micro_batch_size=16"],
    # full recompute: groups of 2 layers (2 inputs kept, one group rebuilt) / the first layer only
    ["model.num_layers=4", "model.recompute_granularity=full", "model.recompute_method=uniform",
     "model.recompute_num_layers=2"],
    ["model.num_layers=4", "model.recompute_granularity=full", "model.recompute_method=block",
     "model.recompute_num_layers=1"],
    # token budget of 5 full rows (48 tokens each) instead of micro-batches of 32 rows
    ["grpo.max_tokens_per_microbatch=240"],
    # a large vocabulary, so that the loss's logits and its chunk temporaries dominate the step's peak:
    # 1024 tokens per micro-batch in chunks of 128, and in one chunk (models/logprobs.py)
    *[["model.vocab_size=16384", "model.max_sequence_length=128", "grpo.prompts_per_step=4", "grpo.micro_batch_size=8",
       f"model.logprob_chunk_tokens={chunk}"] for chunk in (128, 0)],
    # one row per micro-batch: megatron's [s, b] -> [b, s] logits copy disappears (planner/memory.logits_peak_bytes)
    ["model.vocab_size=16384", "model.max_sequence_length=512", "grpo.prompts_per_step=1", "grpo.num_generations=2",
     "grpo.micro_batch_size=1", "model.logprob_chunk_tokens=128"],
    # s x s attention scores dominate (8 heads, 512 tokens, narrow layers): the `arbitrary` mask fallback's
    # memory (planner/activations.SCORE_WORKING_COPIES), and the THD stream the local spec masks as a whole
    *[["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=8", "model.ffn_hidden_size=128",
       "model.max_sequence_length=512", "grpo.prompts_per_step=1", "grpo.num_generations=2", "grpo.micro_batch_size=2",
       f"model.attention_layout={layout}"] for layout in ("mask", "thd")],
]
TRAIN_STEP_ITEMS = ("weights", "grads", "optimizer", "activations")


@pytest.mark.slow
def test_predicted_train_step_memory_is_within_15_percent_of_measured_peak():
    result = run_python([str(REPO / "tests/memory_probe.py"), str(REPO / "conf/rlsr_tiny.yaml"), json.dumps(VARIANTS)])
    assert result.returncode == 0, result.stderr[-3000:]
    measured = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(measured) == len(VARIANTS)
    for overrides, m in zip(VARIANTS, measured):
        plan = make_plan(load_config(REPO / "conf/rlsr_tiny.yaml", overrides))
        assert plan.shape.total_params() == m["params"]
        predicted = sum(plan.memory.items[k] for k in TRAIN_STEP_ITEMS)
        error = (predicted - m["peak"]) / m["peak"]
        print(f"{overrides or 'conf/rlsr_tiny.yaml'}: measured peak {m['peak'] / 2**20:.1f} MiB "
              f"(persistent {m['base'] / 2**20:.1f} + step {m['increase'] / 2**20:.1f}), "
              f"predicted {predicted / 2**20:.1f} MiB, error {error:+.1%}")
        assert abs(error) < 0.15
