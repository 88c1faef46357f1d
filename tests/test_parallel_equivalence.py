"""TP, PP and DP layouts compute the same numbers as one process (2 real gloo ranks on the CPU).

Weights are carried between layouts by a dist checkpoint, so these also test resharding on load.
"""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_workers

ATOL = 1e-5


@pytest.mark.slow
def test_tp2_logprobs_and_entropy_match_tp1(tmp_path):
    results = run_workers("tp", tmp_path)
    for rank in results:
        # TP=1 logprobs / entropy against a plain full-softmax computation on the same logits.
        torch.testing.assert_close(rank["logprobs_tp1"], rank["reference_logprobs"], atol=ATOL, rtol=0)
        torch.testing.assert_close(rank["entropy_tp1"], rank["reference_entropy"], atol=ATOL, rtol=0)
        # TP=2 from the TP=1 checkpoint (embedding and linear layers resharded on load).
        torch.testing.assert_close(rank["logprobs_tp2"], rank["logprobs_tp1"], atol=ATOL, rtol=0)
        # Entropy of logits whose vocabulary is split over the two TP ranks.
        torch.testing.assert_close(rank["entropy_tp2_sharded"], rank["entropy_tp2_reference"], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_pp2_train_step_matches_pp1(tmp_path):
    """One step, 2 micro-batches. At PP=1 the 2 ranks are DP=2 with the same whole batch each,
    which is the same step as DP=1 (the global token count doubles along with the loss sum)."""
    results = run_workers("pp", tmp_path)
    for rank in results:
        pp1, pp2 = rank["metrics_pp1"], rank["metrics_pp2"]
        assert pp2["loss"] == pytest.approx(pp1["loss"], rel=1e-5)
        assert pp2["grad_norm"] == pytest.approx(pp1["grad_norm"], rel=1e-5)
        assert pp1["update_skipped"] == pp2["update_skipped"] == 0.0
        torch.testing.assert_close(rank["logprobs_pp2"], rank["logprobs_pp1"], atol=ATOL, rtol=0)
    # Every rank reports the same metrics (broadcast from the last stage).
    assert results[0]["metrics_pp2"] == results[1]["metrics_pp2"]


@pytest.mark.slow
def test_dp2_token_mean_is_global(tmp_path):
    """DP=2 with 16 and 15 loss tokens on the two ranks equals one process on the whole batch:
    gradients are divided by the global token count, not averaged per rank."""
    (reference,) = run_workers("dp_reference", tmp_path, nprocs=1)
    split = run_workers("dp_split", tmp_path)
    assert [rank["local_tokens"] for rank in split] == [16.0, 15.0]
    for rank in split:
        assert rank["metrics"]["num_tokens"] == reference["metrics"]["num_tokens"] == 31.0
        assert rank["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], rel=1e-5)
        assert rank["metrics"]["grad_norm"] == pytest.approx(reference["metrics"]["grad_norm"], rel=1e-5)
    # The 1-rank checkpoint loaded on 2 ranks: weights and optimizer load, RNG states are skipped.
    assert any("RNG states not restored" in message for message in split[0]["warnings"])
