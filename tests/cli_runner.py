"""How the tests start processes: every child a test starts gets its environment from `child_env`.

* `run_cli` / `cli`: `python -m nemo_rlsr.cli ...` to completion, as a user runs it, on one rank or
  on N under torchrun; the exit code is checked (0 unless the test expects a failure).
* `run_python`: any other script or `-c` snippet (benchmarks, probes) to completion.
* `start_ranks` / `start_cli`: N processes in the background, one per rank, the way srun starts a
  job's tasks (RANK, WORLD_SIZE, ... in each environment, each rank in its own session so that a
  test can signal one rank's processes, checkpoint-writer helpers included, as Slurm does), output
  to a log file per rank: the kill / preemption tests, and the multi-rank worker scripts
  (distributed_helpers.run_workers). `wait_all`, `kill_all` and `logs` go with them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from nemo_rlsr.distributed.parallel import free_port

REPO = Path(__file__).resolve().parents[1]
# What a launcher sets up for its children: inherited, they would make a child join (or bind) the
# test session's own process group (its in-process gloo group sets MASTER_*) or its Ray cluster.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                      "TORCHELASTIC_RUN_ID", "RAY_ADDRESS")


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without `LAUNCHER_VARIABLES`, and: this checkout first on PYTHONPATH
    (the code under test is what runs; a container's own entries stay after it); OMP_NUM_THREADS=1,
    so that N ranks on N cores do not oversubscribe them and a run's floats (its weights digest) do
    not depend on the machine's core count; warnings off (megatron's would bury the error a failed
    run's output is shown for). `extra` last."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"} | extra


def run_python(argv: Sequence[str], timeout: float = 600, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """`python <argv>` from the repository root, to completion, its output captured."""
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_cli(*args: str, nprocs: int = 1, timeout: float = 600, expect: int = 0) -> str:
    """stdout + stderr of `nemo-rlsr <args>` (under torchrun on `nprocs` local ranks when > 1), which
    must exit with `expect`; otherwise AssertionError with the end of its output."""
    launcher = []
    if nprocs > 1:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", f"--master_port={free_port()}"]
    argv = [*launcher, "-m", "nemo_rlsr.cli", *args]
    result = run_python(argv, timeout)
    output = result.stdout + result.stderr
    if result.returncode != expect:
        raise AssertionError(f"python {' '.join(argv)} exited {result.returncode}, not {expect}:\n{output[-6000:]}")
    return output


def cli(command: str, config: str, args: Sequence[str], nprocs: int = 1, timeout: float = 600, expect: int = 0) -> str:
    """`nemo-rlsr <command> --config conf/<config> <args>`: see `run_cli`."""
    return run_cli(command, "--config", str(REPO / "conf" / config), *args, nprocs=nprocs, timeout=timeout,
                   expect=expect)


def start_ranks(argv: Sequence[str], log_dir: Path, nprocs: int, tag: str) -> list[subprocess.Popen]:
    """`python <argv>` as ranks 0..nprocs-1 of one job (a fresh localhost port), in the background;
    rank r writes `log_dir/<tag>.rank<r>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(nprocs):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        with open(log_dir / f"{tag}.rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def start_cli(command: str, config: str, args: Sequence[str], log_dir: Path, nprocs: int = 2,
              tag: str = "run") -> list[subprocess.Popen]:
    """`nemo-rlsr <command> --config conf/<config> <args>` on `nprocs` ranks: see `start_ranks`."""
    return start_ranks(["-m", "nemo_rlsr.cli", command, "--config", str(REPO / "conf" / config), *args],
                       log_dir, nprocs, tag)


def kill_all(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL every process of each rank's session (helpers included) and reap the ranks."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_all(procs: Sequence[subprocess.Popen], timeout: float, expect: int = 0) -> list[int]:
    """Every rank's exit code. Once one exits with another code than `expect`, the others are killed
    (they would wait in collectives until their own timeout); past `timeout` all are killed and
    AssertionError is raised."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, expect) for p in procs):
            break
        if time.monotonic() > deadline:
            kill_all(procs)
            raise AssertionError(f"ranks still running after {timeout:.0f}s")
        time.sleep(0.05)
    kill_all([p for p in procs if p.poll() is None])
    return [p.returncode for p in procs]


def logs(log_dir: Path, tag: str, tail: int = 4000) -> str:
    """The end of each rank's log of `start_ranks(..., tag)`, rank by rank."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-tail:]}" for p in sorted(log_dir.glob(f"{tag}.rank*.log")))
