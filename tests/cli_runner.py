"""Runs `python -m nemo_rlsr.cli ...` in a subprocess, as a user would, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from distributed_helpers import free_port

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, nprocs: int = 1, timeout: int = 600) -> str:
    """stdout + stderr of a successful run (under torchrun on `nprocs` local ranks when > 1); a failed
    run raises with the end of its stderr.

    MASTER_ADDR/MASTER_PORT are left out: a test session's in-process group sets them, and a CLI
    that inherits them would try to bind the same port."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nprocs > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", f"--master_port={free_port()}"]
    argv = [*launcher, "-m", "nemo_rlsr.cli", *args]
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result.stdout + result.stderr


def cli(command: str, config: str, args: list[str], nprocs: int = 1) -> str:
    """`nemo-rlsr <command> --config conf/<config> <args>`."""
    return run_cli(command, "--config", str(REPO / "conf" / config), *args, nprocs=nprocs)
