"""Unequal micro-batch counts on 2 DP ranks (gloo): SFT packing and token budgets neither hang nor
diverge, for a dense policy and for an MoE policy at expert parallelism 2 (whose expert layers
exchange tokens between the two DP ranks in every micro-batch); the step equals one rank's with all
examples one per row (tests/microbatch_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_helpers import run_workers

WORKER = Path(__file__).resolve().parent / "microbatch_worker.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("microbatch_dp")
    (result,) = run_workers("reference", out, nprocs=1, timeout_s=240.0, worker=WORKER)
    return out, result


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["packed", "budget"])
def test_unequal_micro_batch_counts_match_one_rank(reference, scenario):
    out, expected = reference
    ranks = run_workers(scenario, out, nprocs=2, timeout_s=240.0, worker=WORKER)
    for name in ("dense", "moe"):
        # rank 0 holds ten long examples, rank 1 two short ones: really unequal micro-batch counts
        counts = [rank[name]["local_micro_batches"] for rank in ranks]
        assert counts[0] >= counts[1] + 2, counts
        for rank in ranks:
            got, want = rank[name], expected[name]
            assert got["num_tokens"] == want["num_tokens"]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            torch.testing.assert_close(got["probe_logprobs"], want["probe_logprobs"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_token_budget_through_two_pipeline_stages(reference):
    out, expected = reference
    for rank in run_workers("pipeline", out, nprocs=2, timeout_s=240.0, worker=WORKER):
        got, want = rank["dense"], expected["dense"]
        assert got["num_tokens"] == want["num_tokens"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        torch.testing.assert_close(got["probe_logprobs"], want["probe_logprobs"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["thd_pp2", "thd_tp2_sp", "thd_moe_ep2"])
def test_thd_streams_across_ranks_match_one_rank_with_masks(reference, layout):
    """THD packed sequences (models/packed_seq.py) at PP=2, TP=2 + SP, and an MoE model at EP=2: the
    step and the probe's logprobs equal the one-rank reference's (one example per row, masks)."""
    out, expected = reference
    for rank in run_workers(layout, out, nprocs=2, timeout_s=240.0, worker=WORKER):
        (name, got), = rank.items()
        want = expected[name]
        assert got["num_tokens"] == want["num_tokens"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        torch.testing.assert_close(got["probe_logprobs"], want["probe_logprobs"], atol=1e-5, rtol=0)
