"""The local Slurm of tests/slurm/cluster.sh, as the Slurm tests use it: find it, submit, poll.

`make test` starts the cluster before the suite and stops it afterwards; a developer runs
`tests/slurm/cluster.sh start` once. Without it the tests that need it skip, except under CI=true,
where they fail: a CI run that skipped them would have checked nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


def cluster_env() -> dict[str, str]:
    """os.environ with SLURM_CONF of the running local cluster and no SLURM_* / NEMO_RLSR_* of ours."""
    status = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True, timeout=60)
    if status.returncode != 0:
        message = f"no local Slurm (start it: {CLUSTER.relative_to(REPO)} start): {status.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    conf = status.stdout.strip().removeprefix("SLURM_CONF=")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMO_RLSR_"))}
    return env | {"SLURM_CONF": conf}


def slurm(env: dict, *args: str, check: bool = True, cwd: Path | None = None, retries: int = 0) -> str:
    """stdout of a Slurm client command (`sbatch`, `scontrol`, `scancel`, ...), run in `cwd`.

    `retries`: for read-only queries, how often to ask again after a transient failure: a client
    killed by a signal (seen: `scontrol show job` dying of SIGPIPE when slurmctld dropped the
    connection on a machine at load 25) or slurmctld not answering in time."""
    for attempt in range(retries + 1):
        result = subprocess.run(list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
        transient = result.returncode < 0 or "timed out" in result.stderr or "Unable to contact" in result.stderr
        if result.returncode == 0 or not transient or attempt == retries:
            break
        time.sleep(2.0)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def job(env: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job -o`: {JobState, Restarts, ExitCode, Reason, ...}."""
    line = slurm(env, "scontrol", "show", "job", "-o", job_id, retries=3)
    return dict(re.findall(r"(\w+)=(\S*)", line))


def wait_for(condition: Callable[[], bool], timeout: float, what: str, describe: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{describe()}")
        time.sleep(0.5)


def wait_for_state(env: dict, job_id: str, states: set[str], timeout: float, describe: Callable[[], str] = str
                   ) -> dict[str, str]:
    """Poll until the job is in one of `states` (e.g. {"COMPLETED", "FAILED"}); its record."""
    wait_for(lambda: job(env, job_id)["JobState"] in states, timeout, f"job {job_id} in {states}",
             lambda: f"{job(env, job_id)}\n{describe()}")
    return job(env, job_id)


def daemon_log_lines(env: dict, job_id: str, tail: int = 60) -> str:
    """The last lines of slurmctld.log and slurmd.log that name job `job_id` (cluster.sh keeps both
    under the cluster's folder, next to etc/): why Slurm failed or held a job, for an assertion message."""
    log_dir = Path(env["SLURM_CONF"]).parents[1] / "log"
    pattern = re.compile(rf"\b(?:JobId|job_id|[Jj]ob|StepId)[= ]?{job_id}\b")
    parts = []
    for name in ("slurmctld.log", "slurmd.log"):
        path = log_dir / name
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        parts.append(f"--- {path} (lines naming job {job_id})\n" + "\n".join([l for l in lines if pattern.search(l)][-tail:]))
    return "\n".join(parts)


def job_steps_alive(job_id: str) -> list[str]:
    """The slurmstepd processes of job `job_id` on this machine, by the title slurmstepd gives itself
    ("slurmstepd: [7.1]", "slurmstepd: [7.batch]"): the single-node test cluster's view of which
    steps of the job are still being run or torn down."""
    title = re.compile(rf"^slurmstepd: \[{job_id}\.[^\]]+\]")
    alive = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended while we looked
            continue
        if title.match(text):
            alive.append(text)
    return alive
