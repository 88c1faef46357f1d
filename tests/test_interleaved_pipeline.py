"""Interleaved (virtual) pipeline parallelism through the real MegatronPolicy on 2 gloo ranks:
PP=2 x VPP=2 trains exactly like PP=1 from the same checkpoint, its checkpoint loads at PP=1, and
`nemo-rlsr sft` runs it; plus the start-up refusals that go with it (and MoE at TP>1 without SP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_runner import cli
from nemo_rlsr.config import load_config
from nemo_rlsr.distributed.layout import run_problems
from tests.distributed_helpers import run_workers, token_batch

WORKER = Path(__file__).resolve().parent / "vpp_worker.py"
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5
# A 28-layer model shape for the layout rules (nothing is built).
SHAPE = ["model.num_layers=28", "model.hidden_size=1536", "model.num_attention_heads=12",
         "model.num_query_groups=2", "model.ffn_hidden_size=8960", "model.params_dtype=bfloat16"]


@pytest.mark.slow
def test_pp2_vpp2_matches_pp1_and_reshards(tmp_path):
    results = run_workers("interleaved", tmp_path, worker=WORKER, timeout_s=240)
    # megatron's interleaving: rank 0 holds virtual stages 0 and 2 (layers 1, 3), rank 1 stages 1 and 3.
    assert [r["chunk_layers"] for r in results] == [[[1], [3]], [[2], [4]]]
    for rank in results:
        pp1, vpp = rank["metrics_pp1"], rank["metrics_vpp"]
        assert vpp["loss"] == pytest.approx(pp1["loss"], rel=1e-6)
        assert vpp["grad_norm"] == pytest.approx(pp1["grad_norm"], rel=1e-5)
        # after the step: the same weights on both layouts
        torch.testing.assert_close(rank["logprobs_vpp"], rank["logprobs_pp1"], atol=ATOL, rtol=0)
        # a single micro-batch is padded to a whole group of PP micro-batches, the extra rows dropped
        torch.testing.assert_close(rank["logprobs_vpp_one_micro"], rank["logprobs_vpp"], atol=ATOL, rtol=0)
        # the interleaved checkpoint (model0, model1) loads at PP=1 with the same weights
        torch.testing.assert_close(rank["logprobs_reloaded"], rank["logprobs_vpp"], atol=ATOL, rtol=0)
        assert "use `policy.chunks`" in rank["module_error"]
        # an HF checkpoint read into the interleaved chunks gives the PP=1 model's logprobs
        torch.testing.assert_close(rank["logprobs_hf_start"], rank["logprobs_start"], atol=ATOL, rtol=0)
    # the interleaved model's HF export holds exactly the tensors PP=1 exports of the same weights
    vpp, pp1 = hf_tensors(tmp_path / "hf_vpp"), hf_tensors(tmp_path / "hf_pp1")
    assert sorted(vpp) == sorted(pp1) and any(".layers.3." in name for name in vpp)
    for name in pp1:
        assert torch.equal(vpp[name], pp1[name]), name


@pytest.mark.slow
def test_pp2_vpp2_with_data_parallel_matches_pp1(tmp_path):
    results = run_workers("interleaved_dp2", tmp_path, nprocs=4, worker=WORKER, timeout_s=240)
    for rank in results:
        pp1, vpp = rank["pp1"], rank["vpp"]
        assert (pp1["dp"], vpp["dp"]) == (4, 2)
        assert vpp["metrics"]["loss"] == pytest.approx(pp1["metrics"]["loss"], rel=1e-6)
        assert vpp["metrics"]["num_tokens"] == pp1["metrics"]["num_tokens"] == float(token_batch().loss_mask.sum())
        assert vpp["metrics"]["grad_norm"] == pytest.approx(pp1["metrics"]["grad_norm"], rel=1e-5)
        torch.testing.assert_close(vpp["logprobs"], pp1["logprobs"], atol=ATOL, rtol=0)


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: t for file in sorted(hf_dir.glob("*.safetensors")) for name, t in load_file(file).items()}


@pytest.mark.slow
def test_sft_cli_runs_interleaved_pipeline_on_two_ranks(tmp_path):
    """The real trainer path: `nemo-rlsr sft` under torchrun, 4 layers over PP=2 x VPP=2."""
    cli("sft", "sft_tiny.yaml", ["model.num_layers=4", "parallel.pipeline_parallel=2",
                                 "parallel.virtual_pipeline_parallel=2", "sft.steps=4", "sft.warmup_steps=0",
                                 "sft.micro_batch_size=8", "trainer.progress_bar=false",
                                 f"trainer.output_dir={tmp_path}"], nprocs=2)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def problems(world: int, mode: str, *overrides: str) -> list[str]:
    return run_problems(load_config(None, SHAPE + list(overrides)), world, "2.5", (9, 0), mode)


def test_interleaved_needs_whole_groups_of_pp_micro_batches():
    vpp = ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2"]
    # sft: 16 rows / (DP=1 x 8) = 2 micro-batches per step: one group of PP=2
    assert problems(2, "sft", *vpp, "sft.global_batch_size=16", "sft.micro_batch_size=8") == []
    (problem,) = problems(2, "sft", *vpp, "sft.global_batch_size=24", "sft.micro_batch_size=8")
    assert "parallel.virtual_pipeline_parallel=2" in problem and "parallel.pipeline_parallel=2" in problem
    assert "sft.micro_batch_size=8) = 3" in problem
    # rlsr: 4 prompts x 8 rollouts = 32 rows per mini-batch / 32 = 1 micro-batch
    (problem,) = problems(2, "rlsr", *vpp, "grpo.prompts_per_step=4", "grpo.micro_batch_size=32")
    assert "grpo.micro_batch_size=32 = 1" in problem
    assert problems(2, "rlsr", *vpp, "grpo.prompts_per_step=4", "grpo.micro_batch_size=16") == []
    # without virtual stages the plain 1F1B schedule takes any count
    assert problems(2, "sft", "parallel.pipeline_parallel=2", "sft.global_batch_size=24", "sft.micro_batch_size=8") == []


@pytest.mark.parametrize("mode", ["sft", "rlsr"])
def test_moe_at_tp2_needs_sequence_parallel(mode):
    moe = ["model.num_moe_experts=4", "parallel.tensor_parallel=2", "grpo.prompts_per_step=8",
           "grpo.micro_batch_size=8", "sft.global_batch_size=16", "sft.micro_batch_size=8"]
    (problem,) = problems(2, mode, *moe)
    assert "model.num_moe_experts=4" in problem and "parallel.tensor_parallel=2" in problem
    assert "parallel.sequence_parallel=true" in problem
    assert problems(2, mode, *moe, "parallel.sequence_parallel=true") == []
    assert problems(2, mode, *moe[:1], "parallel.tensor_parallel=1", *moe[2:]) == []
