"""Uneven pipeline stages (`parallel.num_layers_in_first/last_pipeline_stage`) through the real
MegatronPolicy on 2 gloo ranks: 3 layers split 1 + 2 train exactly like PP=1, and checkpoints
reshard between the uneven and the even layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import run_workers
from cli_runner import cli

WORKER = Path(__file__).resolve().parent / "layout_worker.py"
ATOL = 1e-5


@pytest.mark.slow
def test_uneven_pp2_matches_pp1_and_reshards(tmp_path):
    results = run_workers("uneven", tmp_path, worker=WORKER, timeout_s=240)
    assert [r["stage_layers"] for r in results] == [1, 2]
    for rank in results:
        pp1, pp2 = rank["metrics_pp1"], rank["metrics_pp2"]
        assert pp2["loss"] == pytest.approx(pp1["loss"], rel=1e-5)
        assert pp2["grad_norm"] == pytest.approx(pp1["grad_norm"], rel=1e-5)
        torch.testing.assert_close(rank["logprobs_pp2"], rank["logprobs_pp1"], atol=ATOL, rtol=0)
        # The uneven layout's checkpoint, loaded at PP=1, gives the uneven model's logprobs.
        torch.testing.assert_close(rank["logprobs_reloaded"], rank["logprobs_pp2"], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_sft_cli_runs_uneven_stages_on_two_ranks(tmp_path):
    """The real trainer path: `nemo-rlsr sft` under torchrun, 3 layers over 2 stages (1 + 2)."""
    out = cli("sft", "sft_tiny.yaml", ["model.num_layers=3", "parallel.pipeline_parallel=2",
                                       "parallel.num_layers_in_first_pipeline_stage=1", "sft.steps=2",
                                       "sft.micro_batch_size=8", "trainer.heldout_eval=false",
                                       "trainer.progress_bar=false", f"trainer.output_dir={tmp_path}"], nprocs=2)
    assert "sft loss (response tokens)" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
