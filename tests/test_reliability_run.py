"""The real CLI on 2 gloo ranks, killed the hard and the polite way; and a run of NaN losses.

Ranks are launched the way srun does it (one process per rank, RANK/WORLD_SIZE in the environment),
each in its own session, so a test can signal one rank's processes (as Slurm signals every process
of a task, checkpoint-writer helpers included) or SIGKILL everything.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from cli_runner import cli, kill_all, logs, start_cli, wait_all
from test_rlsr_run import TINY, records

from nemo_rlsr.trainer.manifest import verify_checkpoint
from nemo_rlsr.trainer.preemption import PREEMPTED_EXIT_CODE

# The end-to-end tests' tiny run, except that pre-training length stays the demo's (150 steps).
SMALL = [arg for arg in TINY if not arg.startswith("pretrain.")] + ["trainer.heldout_eval=false"]


def launch(args: list[str], log_dir: Path, tag: str = "run") -> list:
    """`nemo-rlsr train` on 2 ranks in the background (cli_runner.start_cli)."""
    return start_cli("train", "rlsr_tiny.yaml", args, log_dir, nprocs=2, tag=tag)


def run_to_end(args: list[str], log_dir: Path, tag: str, timeout: float = 300) -> str:
    codes = wait_all(launch(args, log_dir, tag=tag), timeout)
    assert codes == [0, 0], f"{tag}: exit codes {codes}\n{logs(log_dir, tag)}"
    return logs(log_dir, tag)


def wait_for_step(run_dir: Path, step: int, procs, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited before step {step}")
        time.sleep(0.02)
    kill_all(procs)
    raise AssertionError(f"step {step} not reached in {timeout:.0f}s")


def complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in sorted(root.glob("step_???????")) if p.is_dir() and not verify_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


# The SIGKILL test's run: a checkpoint every step, a NaN at step 2 (the skip-and-count path is part
# of what must resume exactly).
KILLED_RUN = SMALL + ["pretrain.steps=10", "trainer.steps=6", "trainer.checkpoint_every=1",
                      "trainer.keep_last_checkpoints=3", "trainer.debug_inject_nan_steps=[2]"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The summary of `KILLED_RUN` uninterrupted: what every killed-and-resumed run must end with."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(KILLED_RUN + [f"trainer.output_dir={root / 'run'}"], root, "reference")
    expected = json.loads((root / "run" / "summary.json").read_text())
    assert expected["skipped_nonfinite_updates"] == 1
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("kill_step, delay", [(3, 0.0), (5, 0.3)], ids=["step3_at_once", "step5_after_0.3s"])
def test_sigkill_then_resume_auto_ends_bit_identical_skipping_a_corrupt_checkpoint(uninterrupted, kill_step, delay,
                                                                                   tmp_path):
    """The run SIGKILLed (every process) `delay` seconds after step `kill_step` was logged (mid-step
    or mid-save, depending on the machine's speed), its newest complete checkpoint truncated, and
    `--resume auto`: it must warn, resume from the previous checkpoint, and end with the
    uninterrupted run's weights."""
    interrupted = tmp_path / "interrupted"
    procs = launch(KILLED_RUN + [f"trainer.output_dir={interrupted}"], tmp_path, tag="killed")
    wait_for_step(interrupted, kill_step, procs)
    time.sleep(delay)
    kill_all(procs)
    context = f"(SIGKILL {delay:.2f}s after step {kill_step} was logged)"

    complete = complete_checkpoints(interrupted / "checkpoints")
    assert len(complete) >= 2, f"{context} {complete}"
    newest, previous = complete[-1], complete[-2]
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    output = run_to_end(KILLED_RUN + [f"trainer.output_dir={interrupted}", "--resume", "auto"], tmp_path, "resumed")
    assert f"skipping incomplete or corrupt checkpoint {newest}" in output, f"{context}\n{output}"
    assert f"resumed from {previous} at step" in output, f"{context}\n{output}"
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["param_sha256"] == uninterrupted["param_sha256"], context
    assert summary["skipped_nonfinite_updates"] == 1, context
    assert sorted(records(interrupted)) == [1, 2, 3, 4, 5, 6]
    assert verify_checkpoint(interrupted / "checkpoints" / "step_0000006") == []


@pytest.mark.slow
def test_sigterm_mid_step_saves_a_complete_checkpoint_and_exits_75(tmp_path):
    """Rank 1 stalls 3 s at the start of step 3 (rank 0 waits for it in the gradient all-reduce);
    SIGTERM reaches rank 1's processes only, mid-stall. Both ranks must finish step 3, agree to
    stop, save step 3 (no save is scheduled otherwise) and exit 75 in bounded time; the watchdog
    must have dumped both ranks' stacks."""
    run_dir = tmp_path / "run"
    args = SMALL + ["pretrain.steps=0", "trainer.steps=50", "trainer.debug_stall_step=3",
                    "trainer.debug_stall_s=3", "trainer.watchdog_step_s=1.5", f"trainer.output_dir={run_dir}"]
    procs = launch(args, tmp_path)
    wait_for_step(run_dir, 2, procs)
    time.sleep(0.8)
    os.killpg(procs[1].pid, signal.SIGTERM)
    sent = time.monotonic()
    codes = wait_all(procs, timeout=120, expect=PREEMPTED_EXIT_CODE)
    elapsed = time.monotonic() - sent
    print(f"SIGTERM to exit of both ranks: {elapsed:.1f}s")
    assert codes == [PREEMPTED_EXIT_CODE] * 2, f"{codes}\n{logs(tmp_path, 'run')}"
    # ~2 s of stall left + the step + a save: 6-9 s on 2 idle cores, 13 s at load average 20.
    # The bound is what matters: far below a collective timeout or Slurm's KillWait + grace.
    assert elapsed < 60, elapsed

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000003"
    assert verify_checkpoint(checkpoints / "step_0000003") == []
    assert sorted(records(run_dir)) == [1, 2, 3]
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["step"] == 3 and marker["exit_code"] == PREEMPTED_EXIT_CODE
    assert "preempted by" in logs(tmp_path, "run")

    stacks = {rank: (run_dir / "stacks" / f"rank{rank:05d}.txt").read_text() for rank in (0, 1)}
    assert all("step 3 running for" in text for text in stacks.values()), stacks
    assert "train_step" in stacks[1]  # rank 1 stalls in the step; rank 0 waits for it in megatron's all-reduce
    assert "finalize_model_grads" in stacks[0] and "finalize_model_grads" not in stacks[1], stacks
    assert "SIGTERM" in marker["signal"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "sft"])
def test_injected_nans_are_skipped_counted_and_stop_the_run_after_k_in_a_row(command, tmp_path):
    """Both trainers run the same step loop (trainer/loop.py) and so the same guard."""
    run_dir = tmp_path / "run"
    own = {"train": ["rlsr_tiny.yaml", *SMALL, "pretrain.steps=0", "trainer.steps=8"],
           "sft": ["sft_tiny.yaml", "sft.steps=8", "trainer.progress_bar=false"]}[command]
    output = cli(command, own[0], [*own[1:], "trainer.debug_inject_nan_steps=[2,4,5,6]",
                                   "trainer.max_consecutive_nonfinite=3", f"trainer.output_dir={run_dir}"],
                 timeout=300, expect=3)
    assert "3 consecutive updates with a non-finite loss" in output, output[-4000:]
    assert "step 6" in output and "trainer.max_consecutive_nonfinite=3" in output
    logged = records(run_dir)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert [logged[s]["guard/skipped_updates"] for s in range(1, 7)] == [0, 1, 0, 1, 1, 1]
    assert logged[6]["guard/skipped_updates_total"] == 4
    assert math.isnan(logged[2]["loss"]) and math.isfinite(logged[3]["loss"])
