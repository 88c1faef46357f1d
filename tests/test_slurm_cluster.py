"""slurm/ under a real Slurm (tests/slurm/cluster.sh: Debian's slurmctld + slurmd + munge on loopback).

Every job is the tiny recipe, `sbatch slurm/rlsr_tiny.sh` (2 gloo ranks on the one node, the bare
runtime with this test's Python environment), a few short steps, submitted and signalled with the
real sbatch / scancel / scontrol. Rank 1 sleeps 15 s at the start of step 3 (trainer.debug_stall_*),
so a signal sent 1 s after step 2 is logged lands inside step 3, with a margin for a loaded machine
(one unexplained failure of the requeue test at load 25 with 6 s): the trainer must finish step 3,
save it and exit 75. A requeued job waits for its begin time, now + the credential lifetime (120 s:
slurmctld job_mgr.c sets begin_time = now + cred_expire + 1 on requeue, so that the new launch
credential postdates the revoked one); the tests move it to now with `scontrol update
StartTime=now`, as an admin would, once the requeue is done and every slurmstepd of the first attempt
has exited. That delay also covers the old steps' teardown, which slurmctld does not wait for: in one run
(slurmd.log) the first attempt's step 6.1 ended 1 s after the requeued job's batch script had started
and 1.5 s before the new attempt launched its own step 6.1; a requeued job released at once could launch
a step whose id the old slurmstepd still holds (CI once saw the requeued job FAIL at this point).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from distributed_helpers import free_port
from slurm_helpers import cluster_env, daemon_log_lines, job, job_steps_alive, slurm, wait_for, wait_for_state
from test_rlsr_run import TINY

from nemo_rlsr.config import load_config
from nemo_rlsr.planner import make_plan
from nemo_rlsr.planner.checkpoint import rank_write_bytes
from nemo_rlsr.trainer.manifest import verify_checkpoint
from nemo_rlsr.trainer.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = ["trainer.heldout_eval=false", "trainer.steps=6", "trainer.checkpoint_every=2",
         "trainer.debug_stall_step=3", "trainer.debug_stall_s=15"]
HOST = socket.gethostname().split(".")[0]  # srun's %N: the per-node log is <host>.log
JOB_TIMEOUT = 600


SUBMITTED: list[tuple[dict, str]] = []  # (env, job id) of every job these tests submit


@pytest.fixture(scope="module")
def cluster():
    yield cluster_env()
    for env, job_id in SUBMITTED:  # a failed test leaves nothing running or queued
        slurm(env, "scancel", job_id, check=False)


class TinyJob:
    """One `sbatch slurm/rlsr_tiny.sh` submitted from `root/submit`, runs under `root/runs`."""

    def __init__(self, cluster: dict, root: Path, *args: str, env: dict | None = None):
        self.submit_dir, runs = root / "submit", root / "runs"
        self.submit_dir.mkdir(parents=True)
        self.env = {**cluster, "NEMO_RLSR_REPO": str(REPO), "NEMO_RLSR_VENV": sys.prefix,
                    "NEMO_RLSR_RUNS": str(runs), "NEMO_RLSR_RDZV_PORT": str(free_port()), **(env or {})}
        self.id = slurm(self.env, "sbatch", "--parsable", str(REPO / "slurm/rlsr_tiny.sh"), *TINY, *STEPS, *args,
                        cwd=self.submit_dir).strip().split(";")[0]
        SUBMITTED.append((self.env, self.id))
        self.run_dir = runs / "rlsr_tiny"
        self.log_dir = self.run_dir / "slurm" / self.id

    @property
    def out(self) -> Path:
        return self.submit_dir / f"slurm-rlsr-tiny-{self.id}.out"

    def logs(self) -> str:
        parts = [self.out, *sorted(self.log_dir.glob("*.log"))] if self.log_dir.exists() else [self.out]
        files = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in parts if p.exists())
        return f"{files}\n{daemon_log_lines(self.env, self.id)}"

    def steps_logged(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    def signal_inside_step_3(self, *scancel: str) -> None:
        wait_for(lambda: self.steps_logged() >= 2 or job(self.env, self.id)["JobState"] not in ("PENDING", "RUNNING"),
                 JOB_TIMEOUT, f"step 2 of job {self.id}", self.logs)
        assert self.steps_logged() == 2, self.logs()
        time.sleep(1)
        slurm(self.env, "scancel", *scancel, self.id)

    def wait_requeued(self) -> dict:
        """Until the job is back in the queue after its requeue, held by its begin time (the
        scheduler names that reason a moment after the requeue: Reason=None until then)."""
        state = wait_for_state(self.env, self.id, {"PENDING", "COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT, self.logs)
        assert state["JobState"] == "PENDING" and state["Restarts"] == "1", f"{state}\n{self.logs()}"
        wait_for(lambda: job(self.env, self.id)["Reason"] == "BeginTime", 60, "Reason=BeginTime",
                 lambda: str(job(self.env, self.id)))
        return job(self.env, self.id)

    def release_requeued(self) -> None:
        """Start the requeued job now instead of after its begin-time delay, once the first attempt's
        slurmstepd processes are gone (the delay would have covered their teardown)."""
        wait_for(lambda: not job_steps_alive(self.id), 120, f"the slurmstepd processes of job {self.id} to exit",
                 lambda: "\n".join(job_steps_alive(self.id)))
        slurm(self.env, "scontrol", "update", f"JobId={self.id}", "StartTime=now")

    def wait_done(self) -> dict:
        return wait_for_state(self.env, self.id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT, self.logs)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_saved_step_3(tiny: TinyJob, signal_name: str) -> None:
    marker = json.loads((tiny.run_dir / "preempted.json").read_text())
    assert marker["step"] == 3 and marker["exit_code"] == PREEMPTED_EXIT_CODE, marker
    assert signal_name in marker["signal"], marker
    assert verify_checkpoint(tiny.run_dir / "checkpoints" / "step_0000003") == []


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    tiny = TinyJob(cluster, tmp_path_factory.mktemp("uninterrupted"))
    return tiny, tiny.wait_done()


def test_tiny_recipe_runs_to_completion_with_its_files_where_the_docs_say(uninterrupted):
    tiny, state = uninterrupted
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{tiny.logs()}"
    assert state["Restarts"] == "0"
    # docs/launch.md "Logs": the batch output in the submit directory, the run under
    # $NEMO_RLSR_RUNS/<config name>, the launcher's files under its slurm/<job id>/.
    assert "job step exited with 0" in tiny.out.read_text()
    for name in ("launch.log", "plan.txt", "launch.env", f"{HOST}.log"):
        assert (tiny.log_dir / name).is_file(), name
    assert "verdict: fits" in (tiny.log_dir / "plan.txt").read_text()
    assert summary(tiny.run_dir)["steps"] == 6
    assert verify_checkpoint(tiny.run_dir / "checkpoints" / "step_0000006") == []
    # Two ranks, and what each wrote is what the planner's save-time model says (planner/checkpoint.py:
    # fp32 weights + Adam moments from DP rank 0; rank 1 only its RNG state and the like).
    plan = make_plan(load_config(REPO / "conf/rlsr_tiny.yaml", [*TINY, *STEPS]), gpus_per_node=2)
    planned = rank_write_bytes(plan.cfg, plan.shape, plan.layout)
    step_6 = tiny.run_dir / "checkpoints" / "step_0000006"
    written = [sum(p.stat().st_size for p in step_6.glob(f"__{rank}_*.distcp")) for rank in (0, 1)]
    assert all(w > 0 for w in written), written
    for want, got in zip(planned, written):
        assert abs(got - want) <= 0.05 * want + 64 * 1024, (planned, written)


def test_time_limit_warning_checkpoints_exits_75_and_the_requeued_job_resumes_to_the_same_weights(
        cluster, tmp_path, uninterrupted):
    """`#SBATCH --signal=B:USR1@N` sends USR1 to the batch shell only; `scancel --batch` does the same now."""
    tiny = TinyJob(cluster, tmp_path)
    tiny.signal_inside_step_3("--batch", "--signal=USR1")
    tiny.wait_requeued()
    assert_saved_step_3(tiny, "SIGUSR1")
    node_log = (tiny.log_dir / f"{HOST}.log").read_text()
    assert f"exiting with {PREEMPTED_EXIT_CODE}" in node_log  # each rank; torchrun then exits 1
    tiny.release_requeued()
    state = tiny.wait_done()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1" and state["JobId"] == tiny.id, \
        f"{state}\n{tiny.logs()}"
    launch_log = (tiny.log_dir / "launch.log").read_text()
    assert f"preempted: requeueing job {tiny.id} (attempt 1)" in launch_log
    assert f"job {tiny.id} attempt 1," in launch_log
    assert f"resumed from {tiny.run_dir}/checkpoints/step_0000003 at step 3" in (tiny.log_dir / f"{HOST}.log").read_text()
    assert summary(tiny.run_dir)["param_sha256"] == summary(uninterrupted[0].run_dir)["param_sha256"]


def test_sigterm_to_the_batch_shell_reaches_every_srun_task_as_usr1(cluster, tmp_path):
    """The srun launcher, one task per rank: 2 tasks although the batch environment says
    SLURM_NTASKS=1. TERM to the launcher (`scancel --batch`) must reach them as USR1: srun would
    turn a forwarded TERM into a KILL of its tasks."""
    tiny = TinyJob(cluster, tmp_path, "--launcher", "srun")
    tiny.signal_inside_step_3("--batch", "--signal=TERM")
    tiny.wait_requeued()
    slurm(tiny.env, "scancel", tiny.id)
    launch_log = (tiny.log_dir / "launch.log").read_text()
    assert "received SIGTERM: sending SIGUSR1 to the job step" in launch_log, tiny.logs()
    # srun's status is the first rank's 75, or 143 when --kill-on-bad-exit ended the other rank's
    # exit after its save (75 is "bad" to srun); the marker decides, as with torchrun.
    assert f"preempted: requeueing job {tiny.id}" in launch_log, tiny.logs()
    assert_saved_step_3(tiny, "SIGUSR1")
    task_logs = sorted(p.name for p in tiny.log_dir.glob(f"{HOST}-*.log"))
    assert task_logs == [f"{HOST}-0.log", f"{HOST}-1.log"], task_logs
    assert all(f"exiting with {PREEMPTED_EXIT_CODE}" in (tiny.log_dir / name).read_text() for name in task_logs)


def test_sigterm_to_the_job_step_mid_step_saves_that_step(cluster, tmp_path):
    """`scancel --signal=TERM` signals every process of the job's steps but not the batch shell: what
    preemption with a GraceTime does (unless PreemptParameters=send_user_signal). torchrun gets it
    too and must leave the ranks to finish the step and save."""
    tiny = TinyJob(cluster, tmp_path)
    tiny.signal_inside_step_3("--signal=TERM")
    tiny.wait_requeued()
    slurm(tiny.env, "scancel", tiny.id)
    assert_saved_step_3(tiny, "SIGTERM")
    assert "death signal" not in (tiny.log_dir / f"{HOST}.log").read_text()


def test_a_failed_run_is_not_requeued(cluster, tmp_path):
    """Only a preemption is requeued: a trainer that stops on its own error (here the NaN guard,
    exit 3) fails the job, or a requeueable job would loop on its bug."""
    tiny = TinyJob(cluster, tmp_path, "trainer.debug_inject_nan_steps=[1,2]", "trainer.max_consecutive_nonfinite=2")
    state = tiny.wait_done()
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", f"{state}\n{tiny.logs()}"
    assert "2 consecutive updates with a non-finite loss" in (tiny.log_dir / f"{HOST}.log").read_text()
    launch_log = (tiny.log_dir / "launch.log").read_text()
    assert "job step exited with 1" in launch_log and "requeueing" not in launch_log, tiny.logs()


def test_a_ray_srun_that_dies_ends_the_job_at_once(cluster, tmp_path):
    """A config that needs Ray (reward.backend=ray) whose Ray head cannot start (its port is inside
    Ray's own worker-port range, 10002-19999, which `ray start` refuses): the launcher must stop
    when that srun exits, not poll a head that will never answer."""
    taken = "10002"
    tiny = TinyJob(cluster, tmp_path, "reward.backend=ray", env={"NEMO_RLSR_RAY_PORT": taken})
    started = time.monotonic()
    state = tiny.wait_done()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0", f"{state}\n{tiny.logs()}"
    assert time.monotonic() - started < 240
    launch_log = (tiny.log_dir / "launch.log").read_text()
    assert "the ray-head srun exited before Ray was ready" in launch_log, tiny.logs()
    assert "node.sh torchrun" not in launch_log and not (tiny.run_dir / "metrics.jsonl").exists()  # no trainer
    assert taken in (tiny.log_dir / "ray-head.log").read_text()  # ray start's own complaint
