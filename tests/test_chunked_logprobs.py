"""Lean logprobs (models/logprobs.py): chunked over tokens, entropy only where logged, one norm pass.

Each number is checked against log_softmax of the gathered vocabulary (plain torch) and against the
path it replaced (megatron's vocab_parallel_cross_entropy on the whole micro-batch), at TP=1 in this
process and at TP=2 on 2 gloo ranks (tests/logprob_worker.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_helpers import run_workers
from logprob_worker import CHUNKS, compare_with_references

WORKER = Path(__file__).resolve().parent / "logprob_worker.py"
TOLERANCE = {"float32": 2e-6, "bfloat16": 2e-2}  # bf16: the gradient is rounded to bf16 either way


def check(result: dict, tolerance: float) -> None:
    for name, value in result["before_vs_reference"].items():
        assert value < tolerance, f"the replaced path is itself off the reference ({name}: {value})"
    for chunk in CHUNKS:
        got = result[chunk]
        assert got["no_entropy"], "entropy computed although not asked for"
        for name in ("logprobs", "entropy", "grad", "forward_only"):
            assert got[name] < tolerance, f"chunk_tokens={chunk}: {name} off by {got[name]}"


def test_chunked_logprobs_entropy_and_gradient_equal_the_references_at_tp1(single_rank):
    check(compare_with_references(0, 1), TOLERANCE["float32"])
    check(compare_with_references(0, 1, torch.bfloat16), TOLERANCE["bfloat16"])


@pytest.mark.slow
def test_chunked_logprobs_entropy_and_gradient_equal_the_references_at_tp2(tmp_path):
    for rank in run_workers("tp2", tmp_path, worker=WORKER):
        for dtype, result in rank.items():
            check(result, TOLERANCE[dtype])


def grpo_token_batch():
    from distributed_helpers import token_batch

    batch = token_batch()
    gen = torch.Generator().manual_seed(5)
    shape = batch.input_ids.shape
    batch.extras.update(old_logprobs=-torch.rand(shape, generator=gen) * 3, ref_logprobs=-torch.rand(shape, generator=gen) * 3,
                        advantages=torch.randn(shape[0], generator=gen))
    return batch


def test_policy_step_equals_the_whole_batch_path_and_computes_entropy_only_where_logged(single_rank, monkeypatch):
    """A GRPO train_step with 5-token chunks against the same step through the loss path it replaced
    (benchmarks/logprob_memory_bench.whole_batch_logprobs): metrics (loss, entropy, kl, ...), grad
    norm and per-parameter gradients. The forward-only logprobs pass and a train_step without
    `with_entropy` never ask for the entropy."""
    import dataclasses
    import importlib.util

    import nemo_rlsr.models.policy as policy_module
    from distributed_helpers import VOCAB, optimizer_config, tiny_model_config
    from nemo_rlsr.algorithms.grpo import GRPOLossConfig
    from nemo_rlsr.models.policy import MegatronPolicy
    from nemo_rlsr.trainer.rlsr import grpo_loss_fn

    spec = importlib.util.spec_from_file_location("bench", WORKER.parent.parent / "benchmarks/logprob_memory_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    batch, loss = grpo_token_batch(), grpo_loss_fn(GRPOLossConfig(kl_coef=0.1))
    cfg = dataclasses.replace(tiny_model_config(), logprob_chunk_tokens=5)
    chunked = MegatronPolicy(cfg, optimizer_config(), VOCAB, single_rank)
    whole = MegatronPolicy(cfg, optimizer_config(), VOCAB, single_rank)
    whole.module.load_state_dict(chunked.module.state_dict())
    whole.optimizer.reload_model_params()

    asked = []
    real = policy_module.token_logprobs
    monkeypatch.setattr(policy_module, "token_logprobs", lambda *a: asked.append(a[-1]) or real(*a))
    lean = chunked.logprobs(batch, 2, temperature=0.8)
    got = chunked.train_step(batch, 2, loss, temperature=0.8, with_entropy=True)
    assert asked == [False, False, True, True], "entropy asked for in a forward-only pass"

    monkeypatch.setattr(policy_module, "token_logprobs", bench.whole_batch_logprobs)
    torch.testing.assert_close(lean, whole.logprobs(batch, 2, temperature=0.8), rtol=0, atol=1e-6)
    expected = whole.train_step(batch, 2, loss, temperature=0.8, with_entropy=True)
    for name, value in expected.items():
        assert abs(got[name] - value) <= 1e-6 * max(1.0, abs(value)), (name, got[name], value)
    # the gradients (megatron's reduced main_grad buffers; Adam's update would blow up last-bit
    # differences of near-zero gradients to full steps)
    for (name, a), b in zip(chunked.module.named_parameters(), whole.module.parameters()):
        scale = b.main_grad.abs().max().item()
        assert (a.main_grad - b.main_grad).abs().max().item() <= 1e-6 * max(scale, 1e-3), name
    monkeypatch.setattr(policy_module, "token_logprobs", real)
    seen = []
    chunked.train_step(batch, 2, lambda lp, entropy, mb: seen.append(entropy) or (lp.sum() * 0, {}), temperature=0.8)
    assert seen == [None, None]
