"""Checkpoint save / resume: an interrupted run resumed from a checkpoint continues bit-identically."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_workers
from nemo_rlsr.trainer.checkpoint import latest_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["distributed_optimizer", "optimizer"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    """DP=2, each rank its own half batch. Train step 1, save, train step 2 (loss L2, weights W2).
    Then a new process group and a policy from another seed load step 1 and train step 2 again."""
    results = run_workers(f"roundtrip_{optimizer}", tmp_path)
    for rank in results:
        assert rank["hash_fresh"] != rank["hash_2"]  # the new policy's weights came from the checkpoint
        assert rank["loss_2_resumed"] == rank["loss_2"]
        assert rank["grad_norm_2_resumed"] == rank["grad_norm_2"]
        assert rank["hash_2_resumed"] == rank["hash_2"]
        assert rank["extra_loaded"] == rank["extra"]
        for name, saved in rank["draws_saved"].items():
            loaded = rank["draws_loaded"][name]
            assert torch.equal(loaded, saved) if isinstance(saved, torch.Tensor) else loaded == saved, name
        assert rank["latest_after_2"] == "step_0000002"
    # The ranks were seeded differently before saving: each got its own RNG states back.
    assert not torch.equal(results[0]["draws_loaded"]["torch"], results[1]["draws_loaded"]["torch"])

    root = tmp_path / "ckpt"
    # Step 3 was saved with keep_last=2: step 1 is gone, no .tmp is left, `latest` names step 3.
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_0000002", "step_0000003"]
    assert (root / "latest").read_text().strip() == "step_0000003"
    assert latest_checkpoint(root) == root / "step_0000003"


def test_latest_checkpoint_ignores_incomplete_saves(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for name in ["step_0000002", "step_0000010", "step_0000011.tmp"]:
        (tmp_path / name).mkdir()
    # No `latest` file: the newest complete directory, by step number, never a `.tmp` one.
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000010"
    (tmp_path / "latest").write_text("step_0000002\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000002"
    # A `latest` naming a directory that is gone (deleted by hand): fall back to the scan.
    (tmp_path / "latest").write_text("step_0000099\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000010"
