"""The launcher's Ray readiness (slurm/ray_ready.py, slurm/node.sh ray) against a real Ray on loopback.

Two raylets on this machine stand for two nodes of a job: the head, then a worker joining later.
`ray status` (what the launcher waited for before) succeeds as soon as the head is up; ray_ready.py
must keep waiting until the second node has joined with its GPUs (logical GPUs: Ray counts what
it is told). Ray's processes are this test's own: started in their own session, with their own
temp dir, and ended by process group and pid, never by `ray stop` (which would end every Ray of
this user on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distributed_helpers import free_port

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ray_ready(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "slurm/ray_ready.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def end(procs: list[subprocess.Popen], temp: str) -> None:
    """TERM then KILL each `ray start --block` session; then any process still using our temp dir."""
    for proc in procs:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if temp.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_ready_waits_for_every_node_and_its_gpus():
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": f"127.0.0.1:{port}",
           "NEMO_RLSR_NODE_IPS": "nodeA=127.0.0.1 nodeB=127.0.0.1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}  # not whatever token ~/.ray holds
    common = ["--num-gpus=1", "--num-cpus=1", "--object-store-memory=100000000", "--block", "--disable-usage-stats"]
    procs = []
    try:
        procs.append(subprocess.Popen(
            ["bash", str(REPO / "slurm/node.sh"), "ray", "--head", f"--port={port}", f"--temp-dir={temp}",
             "--include-dashboard=false", *common], env={**env, "SLURMD_NODENAME": "nodeA"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 180
        while subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{port}"], env=env,
                             capture_output=True).returncode != 0:
            assert procs[0].poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        # node.sh execs `ray start` with this node's Slurm address (Ray itself then swaps a loopback
        # address for the host's own, which is why the test cannot see 127.0.0.1 in ray.nodes()).
        assert b"--node-ip-address=127.0.0.1\0" in Path(f"/proc/{procs[0].pid}/cmdline").read_bytes()
        # The head alone: `ray status` says yes (the old check), and it is a 1-node cluster; the
        # job's 2 nodes are not there.
        one = ray_ready(env, "--nodes", "1", "--gpus-per-node", "1", "--timeout", "150", "--interval", "1")
        assert one.returncode == 0, one.stdout + one.stderr
        waiting = ray_ready(env, "--nodes", "2", "--gpus-per-node", "1", "--timeout", "3", "--interval", "1")
        assert waiting.returncode == 1, waiting.stdout + waiting.stderr
        assert "1 of 2 nodes, 1 of 2 with 1 GPUs each" in waiting.stdout, waiting.stdout

        procs.append(subprocess.Popen(
            ["bash", str(REPO / "slurm/node.sh"), "ray", f"--address=127.0.0.1:{port}", *common],
            env={**env, "SLURMD_NODENAME": "nodeB"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        ready = ray_ready(env, "--nodes", "2", "--gpus-per-node", "1", "--timeout", "150", "--interval", "1")
        assert ready.returncode == 0, ready.stdout + ready.stderr
        assert "ray_ready: 2 node(s) joined" in ready.stdout
        # Nodes count only with all their GPUs: 2 nodes of 1 GPU are not 2 nodes of 2.
        short = ray_ready(env, "--nodes", "2", "--gpus-per-node", "2", "--timeout", "3", "--interval", "1")
        assert short.returncode == 1 and "2 of 2 nodes, 0 of 2 with 2 GPUs each" in short.stdout, short.stdout
        assert all(proc.poll() is None for proc in procs)
    finally:
        end(procs, temp)


def test_separate_engines_count_gpus_on_their_nodes_only():
    """Separate rollout engines (slurm/ray_cluster.sh): the head gives Ray no GPU, the engines' nodes all theirs."""
    sys.path.insert(0, str(REPO / "slurm"))
    from ray_ready import missing

    def node(address: str, gpus: float, alive: bool = True) -> dict:
        return {"Alive": alive, "NodeManagerAddress": address, "Resources": {"GPU": gpus} if gpus else {}}

    head, engines = node("10.0.0.1", 0), [node("10.0.0.2", 8), node("10.0.0.3", 8)]
    assert missing([head, *engines], 3, 8, gpu_nodes=2) == ""
    assert "3 of 3 nodes, 2 of 3 with 8 GPUs each" in missing([head, *engines], 3, 8)  # the default: every node
    assert "2 of 3 nodes, 1 of 2" in missing([head, engines[0]], 3, 8, gpu_nodes=2)
    assert "2 of 3 nodes" in missing([head, engines[0], node("10.0.0.3", 8, alive=False)], 3, 8, gpu_nodes=2)
    assert "1 of 2 with 8 GPUs" in missing([head, engines[0], node("10.0.0.3", 4)], 3, 8, gpu_nodes=2)


def test_ray_ready_gives_up_without_a_head():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    result = ray_ready(env, "--nodes", "1", "--gpus-per-node", "0", "--address", f"127.0.0.1:{free_port()}",
                       "--timeout", "3", timeout=120)
    assert result.returncode != 0 and "no Ray head at 127.0.0.1:" in result.stderr, result.stdout + result.stderr
