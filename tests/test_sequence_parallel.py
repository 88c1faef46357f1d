"""Sequence parallelism on megatron's local layer spec (compat/megatron.py's norms, models/sequence_parallel.py).

On 2 gloo ranks, TP=2 with sequence parallelism against TP=1 from the same weights (tests/sp_worker.py):
logprobs, one optimizer step (loss, grad norm, logprobs after it, the weights every TP rank holds
whole) and greedy generation through the torch sampler, for a dense model and a Qwen3-MoE-like one;
and the real `nemo-rlsr train` CLI at TP=2 + SP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import run_workers, token_batch

WORKER = Path(__file__).resolve().parent / "sp_worker.py"
ATOL = 1e-5
# Adam's first step is lr * g / (|g| + eps): elements whose gradient is ~eps move by a visibly
# different amount for a 1e-7 difference in g; a gradient missing its TP sum moves weights by ~lr (1e-2).
WEIGHT_ATOL = 1e-4


def test_norm_is_torch_norm_with_megatron_names_and_tag(single_rank):
    from nemo_rlsr.config import ModelConfig
    from nemo_rlsr.models.gpt import build_gpt, transformer_config
    from nemo_rlsr.compat.megatron import SequenceParallelNorm

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      max_sequence_length=32, qk_layernorm=True)
    config = transformer_config(cfg)
    config.sequence_parallel = True  # as at TP>1 (transformer_config switches it off at TP=1)
    norm = SequenceParallelNorm(config, hidden_size=64, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert [(name, p.sequence_parallel) for name, p in norm.named_parameters()] == [("weight", True)]
    # Every norm of the built model, the final one and the qk-norms included, is the tagged torch norm.
    model = build_gpt(cfg, vocab_size=100)
    norms = {name: m for name, m in model.named_modules() if "layernorm" in name and list(m.parameters())}
    assert len(norms) == 2 * 4 + 1 and "decoder.final_layernorm" in norms
    assert all(type(m) is torch.nn.RMSNorm and m.weight.sequence_parallel is False for m in norms.values())


def test_layout_check_accepts_sequence_parallel_without_te():
    from nemo_rlsr.config import load_config
    from nemo_rlsr.distributed.layout import run_problems

    def problems(*overrides: str) -> list[str]:
        recipe = Path(__file__).resolve().parents[1] / "conf" / "rlsr_tiny.yaml"
        return run_problems(load_config(recipe, list(overrides)), 2, te_version=None, capability=None)

    sp = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]
    moe = ["model.num_moe_experts=4", "model.moe_ffn_hidden_size=64"]
    assert problems(*sp) == [] and problems(*sp, *moe) == []
    assert any("needs parallel.sequence_parallel=true" in p for p in problems("parallel.tensor_parallel=2", *moe))
    # TP=1 has no sequence to split: a clear refusal rather than a silent no-op
    assert any("parallel.sequence_parallel needs tensor_parallel > 1" in p
               for p in problems("parallel.sequence_parallel=true"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_tp2_sequence_parallel_matches_tp1(tmp_path, model):
    results = run_workers(model, tmp_path, worker=WORKER, timeout_s=240)
    # sp_worker's 15-token batch; left pads (queries with no key to attend) differ with the padded length
    valid = token_batch().valid[:, :15]
    for rank in results:
        ref, sp = rank["tp1"], rank["tp2_sp"]
        assert not ref["sequence_parallel"] and sp["sequence_parallel"]  # switched back on after generation
        assert sp["sequence_multiple"] == 2 and all(sp["norm_tags"].values()) and sp["norm_tags"]
        torch.testing.assert_close(sp["logprobs"][valid], ref["logprobs"][valid], atol=ATOL, rtol=0)
        assert sp["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert sp["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)
        torch.testing.assert_close(sp["logprobs_after"][valid], ref["logprobs_after"][valid], atol=ATOL, rtol=0)
        assert sp["responses"] == ref["responses"]
        torch.testing.assert_close(sp["engine_logprobs"], ref["engine_logprobs"], atol=ATOL, rtol=0)
        for name, weight in ref["replicated_after"].items():
            torch.testing.assert_close(sp["replicated_after"][name], weight, atol=WEIGHT_ATOL, rtol=0, msg=name)
    for name, weight in results[0]["tp2_sp"]["replicated_after"].items():  # the TP ranks stay identical
        assert torch.equal(results[1]["tp2_sp"]["replicated_after"][name], weight), name
    assert results[0]["tp1"]["grad_norm"] > 0
    if model == "dense":  # the same checks fail when the norms' gradients are not summed over TP
        untagged = [rank["tp2_sp_untagged"]["replicated_after"] for rank in results]
        ref = results[0]["tp1"]["replicated_after"]
        assert max((untagged[0][n] - ref[n]).abs().max() for n in ref) > 100 * WEIGHT_ATOL
        assert any(not torch.equal(untagged[0][n], untagged[1][n]) for n in ref)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_rlsr_cli_runs_with_sequence_parallelism(tmp_path, model):
    """The real trainer path: `nemo-rlsr train` (torch rollout engine) under torchrun at TP=2 + SP;
    the sampler (SP switched off) and the trainer (SP on) give the sampled tokens the same logprobs."""
    from cli_runner import cli
    from test_hf_moe import MOE_OVERRIDES

    cli("train", "rlsr_tiny.yaml", ["pretrain.steps=2", "pretrain.batch_size=8", "grpo.prompts_per_step=4",
                                    "grpo.num_generations=2", "grpo.micro_batch_size=4", "rollout.max_new_tokens=8",
                                    "trainer.steps=2", "trainer.heldout_eval=false", "trainer.progress_bar=false",
                                    f"trainer.output_dir={tmp_path}", "parallel.tensor_parallel=2",
                                    "parallel.sequence_parallel=true", *(MOE_OVERRIDES if model == "moe" else [])],
        nprocs=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(-1.0 <= r["reward/mean"] <= 1.0 for r in records)
    assert all(r["token_mult_prob_error"] == pytest.approx(1.0, abs=1e-4) for r in records), records
