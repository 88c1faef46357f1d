"""`nemo-rlsr sft` under the reliability hooks it shares with `train` (trainer/loop.py), real CLI:
SIGTERM mid-step -> checkpoint + exit 75 -> `--resume auto` ends with an uninterrupted run's
weights. (Injected NaN losses: tests/test_reliability_run.py runs that test for both commands.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cli_runner import cli, kill_all, logs, start_cli
from test_reliability_run import complete_checkpoints, wait_for_step

from nemo_rlsr.trainer.preemption import PREEMPTED_EXIT_CODE

# 8 steps, no scheduled checkpoint before the last: a checkpoint at step 3 can only be the preemption's.
# A NaN at step 2 makes the guard's count part of the state that must survive the resume.
COMMON = ["sft.steps=8", "trainer.checkpoint_every=0", "trainer.progress_bar=false",
          "trainer.debug_inject_nan_steps=[2]"]


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resume_auto_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    cli("sft", "sft_tiny.yaml", COMMON + [f"trainer.output_dir={reference}"])
    expected = json.loads((reference / "summary.json").read_text())
    assert expected["skipped_nonfinite_updates"] == 1

    # The (only) rank stalls 2 s at the start of step 3; SIGTERM arrives mid-stall; the watchdog
    # (1 s) dumps the stalled step's stacks.
    run_dir = tmp_path / "run"
    args = COMMON + ["trainer.debug_stall_step=3", "trainer.debug_stall_s=2", "trainer.watchdog_step_s=1",
                     f"trainer.output_dir={run_dir}"]
    (proc,) = start_cli("sft", "sft_tiny.yaml", args, tmp_path, nprocs=1, tag="run")
    try:
        wait_for_step(run_dir, 2, [proc], timeout=120)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        kill_all([proc])
    output = logs(tmp_path, "run", tail=100_000)
    assert code == PREEMPTED_EXIT_CODE, output[-4000:]
    assert "preempted by SIGTERM after step 3" in output
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker == {"step": 3, "checkpoint": str(run_dir / "checkpoints" / "step_0000003"),
                      "signal": "SIGTERM", "exit_code": PREEMPTED_EXIT_CODE}
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_0000003"]
    assert sorted(records(run_dir)) == [1, 2, 3]
    assert "step 3 running for" in (run_dir / "stacks" / "rank00000.txt").read_text()

    out = cli("sft", "sft_tiny.yaml", COMMON + [f"trainer.output_dir={run_dir}", "--resume", "auto"])
    assert f"resumed from {run_dir / 'checkpoints' / 'step_0000003'} at step 3" in out
    assert not (run_dir / "preempted.json").exists()  # a finished run clears the requeue marker
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["param_sha256"] == expected["param_sha256"]
    assert summary["skipped_nonfinite_updates"] == 1  # the guard's count came back from the checkpoint
    assert sorted(records(run_dir)) == list(range(1, 9))
