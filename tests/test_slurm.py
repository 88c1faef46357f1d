"""Slurm scripts and container scripts: syntax, shellcheck, --dry-run output, preemption requeue.

No Slurm here: a fake `scontrol` (hostname expansion, requeue log) and a fake `srun` (runs the
preflight planner locally, stands in for the trainer step) sit first on PATH, and SLURM_* variables
describe a pretend allocation.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.glob("slurm/*.sh")) + sorted(REPO.glob("containers/*.sh"))

FAKE_SCONTROL = r"""#!/usr/bin/env bash
case $1 in
  show) python3 -c '
import re, sys
m = re.fullmatch(r"(\w+)\[(\d+)-(\d+)\]", sys.argv[1])
if m:
    width = len(m.group(2))
    print("\n".join(f"{m.group(1)}{i:0{width}d}" for i in range(int(m.group(2)), int(m.group(3)) + 1)))
else:
    print(sys.argv[1])' "$3" ;;
  requeue) echo "requeue $2" >> "$FAKE_LOG" ;;
esac
"""

# The trainer step: records itself, optionally leaves the preemption marker, waits for SIGUSR1
# (then exits 75 like the trainer) or exits with FAKE_TRAIN_RC.
FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
args=("$@")
for i in "${!args[@]}"; do
  if [[ ${args[$i]} == nemo-rlsr ]]; then exec "$NEMO_RLSR_PYTHON" -m nemo_rlsr.cli "${args[@]:$((i + 1))}"; fi
  if [[ ${args[$i]} == */node.sh ]]; then
    trap 'echo "trainer got USR1" >> "$FAKE_LOG"; exit 75' USR1
    [[ -n ${FAKE_MARKER:-} ]] && echo '{"exit_code": 75}' > "$FAKE_MARKER"
    if [[ -n ${FAKE_READY:-} ]]; then touch "$FAKE_READY"; while true; do sleep 0.1; done; fi
    exit "${FAKE_TRAIN_RC:-0}"
  fi
done
"""


@pytest.fixture
def slurm_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMO_RLSR_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", NEMO_RLSR_PYTHON=sys.executable, OMP_NUM_THREADS="1",
               FAKE_LOG=str(tmp_path / "fake.log"), SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8",
               NEMO_RLSR_RUNS=str(tmp_path / "runs"))
    return env


def allocation(env: dict, nodes: int) -> dict:
    return {**env, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": f"node[001-{nodes:03d}]"}


def run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script, args, nodes, config, mode", [
    ("slurm/rlsr_qwen7b.sh", [], 4, "conf/rlsr_qwen7b_sb.yaml", "rlsr"),
    ("slurm/rlsr_llama8b.sh", ["qwenem"], 4, "conf/rlsr_llama8b_qwenem.yaml", "rlsr"),
    ("slurm/rlsr_qwen32b.sh", [], 8, "conf/rlsr_qwen32b_sb.yaml", "rlsr"),
    ("slurm/rlsr_moe_1t.sh", [], 64, "conf/rlsr_moe_1t.yaml", "rlsr"),
    ("slurm/sft.sh", ["llama8b"], 2, "conf/sft_llama8b.yaml", "sft"),
])
def test_dry_run_prints_the_job(slurm_env, script, args, nodes, config, mode):
    result = run(script, allocation(slurm_env, nodes), *args, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    lines = [line for line in out.splitlines() if line.startswith("would run: srun")]
    step = next(line for line in lines if "node.sh torchrun" in line)
    # The trainer: one torchrun per node, c10d rendezvous on the first node, inside the container.
    assert f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1" in step
    for flag in (f"--nnodes={nodes}", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29500",
                 "--rdzv-id=4242", "-m nemo_rlsr.cli " + ("train" if mode == "rlsr" else "sft"), f"--config {config}",
                 f"trainer.output_dir={slurm_env['NEMO_RLSR_RUNS']}/{Path(config).stem}"):
        assert flag in step, flag
    assert "--resume auto" in step  # a requeued job continues from its newest checkpoint (or starts fresh)
    for flag in (f"--container-image={REPO}/containers/nemo_rlsr.sqsh", f"--container-mounts={REPO}:/workspace/nemo_rlsr",
                 "/models:/models:ro", "--container-workdir=/workspace/nemo_rlsr", "--no-container-mount-home"):
        assert all(flag in line for line in lines), flag
    # The preflight: printed as the job would run it, and actually run here, at this allocation.
    assert f"nemo-rlsr plan --config {config} --mode {mode} --nodes {nodes} --gpus-per-node 8" in out
    assert f"{nodes} node(s) x 8 h100-80gb" in out and "verdict: fits" in out
    # Ray only where the config needs it (TensorRT-LLM rollouts), over every node.
    ray = [line for line in lines if "ray start" in line]
    if mode == "rlsr":
        assert "ray start --head --port=6379" in ray[0] and "-w node001" in ray[0]
        assert nodes == 1 or f"--nodes={nodes - 1}" in ray[1] and "--address=node001:6379" in ray[1]
    else:
        assert not ray


def test_dry_run_refuses_an_allocation_too_small(slurm_env):
    result = run("slurm/rlsr_qwen32b.sh", allocation(slurm_env, 1), "--dry-run")
    assert result.returncode == 1
    assert "DOES NOT FIT" in result.stdout and "preflight refused conf/rlsr_qwen32b_sb.yaml" in result.stdout
    assert "node.sh" not in result.stdout  # nothing after the preflight


def test_dry_run_srun_launcher(slurm_env):
    env = allocation(slurm_env, 4)
    result = run("slurm/launch.sh", env, "--config", "conf/rlsr_qwen7b_sb.yaml", "--launcher", "srun", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "srun --nodes=4 --ntasks-per-node=8" in result.stdout
    assert "node.sh task python -m nemo_rlsr.cli train --config conf/rlsr_qwen7b_sb.yaml" in result.stdout


def real_job(slurm_env, tmp_path, **fake) -> tuple[dict, Path]:
    """A 1-node CPU 'allocation' running the tiny config (fits, no Ray), trainer faked by srun."""
    run_dir = tmp_path / "run"
    env = {**allocation(slurm_env, 1), "SLURM_GPUS_ON_NODE": "1", "NEMO_RLSR_GPU": "cpu", "NEMO_RLSR_MOUNTS": "",
           "NEMO_RLSR_RUN_DIR": str(run_dir), **fake}
    return env, run_dir


@pytest.mark.parametrize("fake, requeued, status", [
    ({"FAKE_TRAIN_RC": "75"}, True, 0),  # srun launcher: the trainer's own exit code
    ({"FAKE_TRAIN_RC": "1", "FAKE_MARKER": "MARKER"}, True, 0),  # torchrun: exit 1, marker left
    ({"FAKE_TRAIN_RC": "1"}, False, 1),  # a crash is not requeued
    ({"FAKE_TRAIN_RC": "0"}, False, 0),
])
def test_preempted_job_is_requeued(slurm_env, tmp_path, fake, requeued, status):
    env, run_dir = real_job(slurm_env, tmp_path, **fake)
    if "FAKE_MARKER" in env:
        env["FAKE_MARKER"] = str(run_dir / "preempted.json")
    result = run("slurm/launch.sh", env, "--config", "conf/rlsr_tiny.yaml")
    assert result.returncode == status, result.stdout + result.stderr
    log = Path(env["FAKE_LOG"]).read_text()
    assert "nemo-rlsr plan --config conf/rlsr_tiny.yaml" in log and "node.sh torchrun" in log
    assert ("requeue 4242" in log) == requeued
    assert (run_dir / "slurm/4242/launch.log").exists() and (run_dir / "slurm/4242/launch.env").exists()


def test_usr1_is_forwarded_to_the_trainer_and_the_job_requeued(slurm_env, tmp_path):
    env, run_dir = real_job(slurm_env, tmp_path, FAKE_READY=str(tmp_path / "ready"))
    job = subprocess.Popen(["bash", str(REPO / "slurm/launch.sh"), "--config", "conf/rlsr_tiny.yaml"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() is not None else ""
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    log = Path(env["FAKE_LOG"]).read_text()
    assert "trainer got USR1" in log and "requeue 4242" in log
    assert "received SIGUSR1: forwarding" in out


FAKE_TORCHRUN = r"""#!/usr/bin/env bash
# Like torchrun: started by node.sh with SIGUSR1 ignored (it installs no handler), one worker child.
python3 -c '
import pathlib, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))  # the trainer installs its own handler
pathlib.Path(sys.argv[1]).touch()
time.sleep(60)' "$FAKE_READY" &
wait $! && status=0 || status=$?
echo "torchrun survived; worker exited $status" >> "$FAKE_LOG"
exit 1
"""


def test_node_wrapper_relays_usr1_to_the_ranks_not_torchrun(tmp_path):
    (tmp_path / "torchrun").write_text(FAKE_TORCHRUN)
    (tmp_path / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
           "FAKE_READY": str(tmp_path / "ready")}
    node = subprocess.Popen(["bash", str(REPO / "slurm/node.sh"), "torchrun", "--nnodes=1"], env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert node.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    node.send_signal(signal.SIGUSR1)
    assert node.wait(timeout=30) == 1  # torchrun's own status comes back
    assert (tmp_path / "log").read_text().strip() == "torchrun survived; worker exited 75"


def test_launcher_preemption_contract_matches_the_trainer():
    preemption = pytest.importorskip("nemo_rlsr.trainer.preemption")
    text = (REPO / "slurm/launch.sh").read_text()
    assert f"PREEMPTED_EXIT_CODE={preemption.PREEMPTED_EXIT_CODE}" in text
    assert f"PREEMPTED_MARKER={preemption.MARKER}" in text
    assert "USR1" in preemption.PreemptionHandler(["SIGUSR1"]).signals[0].name
    for script in REPO.glob("slurm/*.sh"):
        if script.name not in ("launch.sh", "node.sh"):
            assert "#SBATCH --signal=B:USR1@" in script.read_text() and "#SBATCH --requeue" in script.read_text()


def test_container_scripts_dry_run():
    result = subprocess.run(["bash", str(REPO / "containers/enroot_import.sh"), "--dry-run",
                             "nvcr.io/nvidia/tensorrt-llm/release:1.2.0", "/tmp/x.sqsh"], capture_output=True, text=True)
    assert "enroot import -o /tmp/x.sqsh docker://nvcr.io#nvidia/tensorrt-llm/release:1.2.0" in result.stdout
    result = subprocess.run(["bash", str(REPO / "containers/build.sh"), "--dry-run", "--tag", "nemo_rlsr:t"],
                            capture_output=True, text=True)
    assert f"docker build -f {REPO}/Dockerfile -t nemo_rlsr:t" in result.stdout
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0" in dockerfile
    assert "install_extras.sh" in dockerfile and "check_image.py" in dockerfile
