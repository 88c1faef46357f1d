#!/usr/bin/env bash
# The one launcher behind slurm/rlsr_*.sh and slurm/sft.sh (run as the batch script, via exec).
#
#   launch.sh --config conf/X.yaml [--mode rlsr|sft] [--launcher torchrun|srun] [--runtime pyxis|bare]
#             [--dry-run] [key=value ...]
#
# 1. preflight: `nemo-rlsr plan` at this allocation's size; a config that does not fit stops here
# 2. pyxis: the named container, created on every node by one blocking srun (pyxis makes a named
#    container without a lock across job steps, and the Ray and trainer steps start together)
# 3. a Ray cluster over the allocation when the plan says the config needs one (TensorRT-LLM
#    rollouts or the Ray reward pool); the launcher waits until every node has joined with its
#    GPUs and stops at once if a Ray srun dies; separate rollout engines (rollout.placement=separate,
#    rollout.engine=trtllm) get the allocation's last nodes, the only GPUs Ray has, the trainer the others
# 4. the trainer: one `torchrun` per node (c10d rendezvous on the first node), or one task per rank
# 5. preemption: SIGUSR1 (`#SBATCH --signal=B:USR1@N`) or SIGTERM reaching this shell is sent to the
#    job step as SIGUSR1 (srun would turn a TERM into a KILL of its tasks); the trainer saves a
#    checkpoint and exits PREEMPTED_EXIT_CODE and leaves $RUN_DIR/preempted.json (the step's own
#    status may not say 75: torchrun turns worker exit codes into 1, and srun's --kill-on-bad-exit
#    ends the other ranks' exit once one rank is out) and this script requeues the job, which resumes with
#    `--resume auto`. docs/launch.md "Preemption" has what each Slurm signal path does.
# --dry-run prints every command instead of running it (the preflight still runs, locally).
#
# Runtimes: pyxis runs every step in the image (pyxis + enroot); bare runs the job's own Python
# environment (clusters without pyxis, and tests/test_slurm_cluster.py). Slurm >= 20.11
# (`srun --overlap`); tested on 22.05. Every srun names --ntasks: the batch environment's
# SLURM_NTASKS (exported by 22.05 and again from 23.02.5) otherwise overrides --ntasks-per-node.
#
# Environment (defaults in brackets):
#   NEMO_RLSR_RUNTIME   pyxis | bare [pyxis]; the --runtime flag wins
#   NEMO_RLSR_IMAGE     pyxis: container squashfs [$REPO/containers/nemo_rlsr.sqsh] (containers/enroot_import.sh)
#   NEMO_RLSR_MOUNTS    pyxis: extra mounts [/data:/data:ro,/models:/models:ro]
#   NEMO_RLSR_CONTAINER_ENV  pyxis: more variables whose job value must win over the image's (A,B,...)
#   NEMO_RLSR_VENV      bare: a virtual environment whose bin/ goes first on PATH [python3 on PATH]
#   NEMO_RLSR_RANKS_PER_NODE  trainer processes per node [$SLURM_GPUS_ON_NODE, else 8]
#   NEMO_RLSR_RUNS      runs root [$REPO/runs]; NEMO_RLSR_RUN_DIR [$NEMO_RLSR_RUNS/<config name>]
#   NEMO_RLSR_REPO      the checkout [$SLURM_SUBMIT_DIR]: set it when submitting from elsewhere
#   NEMO_RLSR_GPU       h100-80gb | h200-141gb | cpu for the preflight [the config's cluster.gpu]
#   NEMO_RLSR_SITE_ENV  a file sourced first (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...; slurm/site.env.example)
#   NEMO_RLSR_RDZV_PORT [29500], NEMO_RLSR_RAY_PORT [6379], NEMO_RLSR_RAY_TIMEOUT_S [600]
#   NEMO_RLSR_MAX_REQUEUES [20]; NEMO_RLSR_PYTHON [python3] runs the --dry-run preflight locally
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

PREEMPTED_EXIT_CODE=75 # nemo_rlsr/trainer/preemption.py; tests/test_slurm.py checks they agree
PREEMPTED_MARKER=preempted.json
CONTAINER_REPO=/workspace/nemo_rlsr

config="" mode=rlsr launcher=torchrun runtime=${NEMO_RLSR_RUNTIME:-pyxis} dry_run=0 overrides=()
while (($#)); do
  case $1 in
    --config) config=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --launcher) launcher=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) sed -n '2,40p' "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
[[ -n $config ]] || { echo "launch.sh: --config is required" >&2; exit 2; }
[[ $mode == rlsr || $mode == sft ]] || { echo "launch.sh: --mode rlsr|sft" >&2; exit 2; }
[[ $launcher == torchrun || $launcher == srun ]] || { echo "launch.sh: --launcher torchrun|srun" >&2; exit 2; }
[[ $runtime == pyxis || $runtime == bare ]] || { echo "launch.sh: --runtime pyxis|bare" >&2; exit 2; }

REPO=${NEMO_RLSR_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=/dev/null
[[ -n ${NEMO_RLSR_SITE_ENV:-} ]] && source "$NEMO_RLSR_SITE_ENV"

# ---- the allocation ------------------------------------------------------------------------------
job_id=${SLURM_JOB_ID:-dry-run}
nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
gpus=${SLURM_GPUS_ON_NODE:-8}
ranks_per_node=${NEMO_RLSR_RANKS_PER_NODE:-${gpus%%(*}} # "8(IDX:0-7)" on some Slurm versions
attempt=${SLURM_RESTART_COUNT:-0}
if command -v scontrol >/dev/null 2>&1 && [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  nodes=("$(hostname)")
fi
head_node=${nodes[0]}

config=${config#"$REPO"/} # paths inside the repository work in the container too
name=$(basename "$config" .yaml)
run_dir=${NEMO_RLSR_RUN_DIR:-${NEMO_RLSR_RUNS:-$REPO/runs}/$name}
log_dir=$run_dir/slurm/$job_id

# ---- the runtime: what every srun below adds to run in the job's Python environment ---------------
if [[ $runtime == pyxis ]]; then
  workdir=$CONTAINER_REPO
  image=${NEMO_RLSR_IMAGE:-$REPO/containers/nemo_rlsr.sqsh}
  # The recipes read /data and /models: point NEMO_RLSR_MOUNTS at where they are on this cluster.
  extra_mounts=${NEMO_RLSR_MOUNTS-/data:/data:ro,/models:/models:ro}
  mounts="$REPO:$CONTAINER_REPO,$run_dir:$run_dir${extra_mounts:+,$extra_mounts}"
  # The image's read-only file system holds HOME (--no-container-mount-home): home and caches go
  # into the job's folder, which is mounted.
  export HOME=$log_dir/home XDG_CACHE_HOME=$log_dir/home/.cache TRITON_CACHE_DIR=$log_dir/home/.cache/triton
else
  workdir=$REPO
  extra_mounts=""
  if [[ -n ${NEMO_RLSR_VENV:-} ]]; then export PATH=$NEMO_RLSR_VENV/bin:$PATH; fi
fi

# ---- the environment of every step (srun passes it on; pyxis only with --container-env) ----------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1} # fail fast, not hang
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1} # megatron's TP/SP overlap order
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}                       # tolerate a congested fabric
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}                       # NVLS buffers cost GPU memory
export PYTHONPATH=$workdir${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 # compute nodes read models from local paths only
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
rdzv_port=${NEMO_RLSR_RDZV_PORT:-29500}
if [[ $runtime == pyxis ]]; then
  # pyxis lets the image's value of a variable win over the job's unless the variable is named here
  # (pyxis_slurmstepd.c, spank_import_container_env): every variable this script sets, and the site's.
  container_env=(PYTHONPATH HOME XDG_CACHE_HOME TRITON_CACHE_DIR HF_HUB_OFFLINE TRANSFORMERS_OFFLINE
    OMP_NUM_THREADS NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING CUDA_DEVICE_MAX_CONNECTIONS NCCL_IB_TIMEOUT
    NCCL_NVLS_ENABLE NCCL_SOCKET_IFNAME NCCL_IB_HCA MASTER_ADDR MASTER_PORT
    RAY_ADDRESS NEMO_RLSR_NODE_IPS)
  IFS=, read -ra more <<<"${NEMO_RLSR_CONTAINER_ENV:-}"
  container_env+=("${more[@]}")
  step_opts=(--container-image="$image" --container-mounts="$mounts" --container-workdir="$workdir"
    --container-name="nemo_rlsr_$job_id" --no-container-mount-home
    --container-env="$(IFS=,; echo "${container_env[*]}")")
else
  step_opts=(--chdir="$workdir")
fi

say() { echo "[launch $(date +%H:%M:%S)] $*"; }
show() { # a command line as a shell would take it back (quoted only where needed)
  local arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s ' "$arg"; else printf '%q ' "$arg"; fi
  done
  echo
}
run() { # run, or with --dry-run print, one command
  if ((dry_run)); then printf 'would run: '; show "$@"; else show "$@"; "$@"; fi
}
declare -A background=() # name -> pid of a long-running srun
run_background() { # the same for a long-running step; its output goes to $log_dir/NAME.log
  local name=$1
  shift
  if ((dry_run)); then printf 'would run: '; show "$@"; return; fi
  show "$@"
  "$@" >"$log_dir/$name.log" 2>&1 &
  background[$name]=$!
}

if ((dry_run)); then
  say "DRY RUN: job $job_id, $nnodes node(s) x $ranks_per_node ranks, runtime $runtime: ${nodes[*]}"
  if [[ $runtime == pyxis ]]; then
    for v in "${container_env[@]}"; do [[ -z ${!v:-} ]] || printf -v shown '%s%s=%s ' "${shown:-}" "$v" "${!v}"; done
    say "--container-env: ${shown:-}"
  fi
else
  mkdir -p "$log_dir"
  [[ $runtime == bare ]] || mkdir -p "$TRITON_CACHE_DIR"
  # tee ignores SIGTERM so that the log outlives a `scancel` long enough to say what happened
  exec > >(trap '' TERM && exec tee -a "$log_dir/launch.log") 2>&1
  say "job $job_id attempt $attempt, $nnodes node(s) x $ranks_per_node ranks, runtime $runtime: ${nodes[*]}"
fi

IFS=, read -ra mount_list <<<"$extra_mounts"
for m in "${mount_list[@]}"; do
  [[ -e ${m%%:*} ]] || say "warning: mount source ${m%%:*} does not exist here (set NEMO_RLSR_MOUNTS)"
done

# ---- 1. preflight: does the config fit this allocation? -------------------------------------------
one_task=(--nodes=1 --ntasks=1)
per_node=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1)
cli=(python3 -m nemo_rlsr.cli)
plan_args=(plan --config "$config" --mode "$mode" --nodes "$nnodes" --gpus-per-node "$ranks_per_node")
[[ -n ${NEMO_RLSR_GPU:-} ]] && plan_args+=(--gpu "$NEMO_RLSR_GPU")
if ((dry_run)); then
  env_file=$(mktemp)
  trap 'rm -f "$env_file"' EXIT
  printf 'would run: '
  show srun "${one_task[@]}" "${step_opts[@]}" "${cli[@]}" "${plan_args[@]}" --launch-env "$log_dir/launch.env" "${overrides[@]}"
  say "preflight (locally, with ${NEMO_RLSR_PYTHON:-python3}):"
  (cd "$REPO" && "${NEMO_RLSR_PYTHON:-python3}" -m nemo_rlsr.cli "${plan_args[@]}" --launch-env "$env_file" "${overrides[@]}") ||
    { say "preflight refused $config: it does not fit $nnodes node(s) x $ranks_per_node ranks (see above)"; exit 1; }
else
  env_file=$log_dir/launch.env
  srun "${one_task[@]}" "${step_opts[@]}" "${cli[@]}" "${plan_args[@]}" --launch-env "$env_file" "${overrides[@]}" |
    tee "$log_dir/plan.txt" ||
    { say "preflight refused $config: it does not fit $nnodes node(s) x $ranks_per_node ranks (see $log_dir/plan.txt)"; exit 1; }
fi
# shellcheck source=/dev/null
source "$env_file"
# Separate rollout engines (rollout.placement=separate, rollout.engine=trtllm) take the allocation's
# last NEMO_RLSR_ENGINE_NODES nodes, which only Ray uses (ray_cluster.sh); the trainer the others.
engine_nodes=${NEMO_RLSR_ENGINE_NODES:-0}
trainer_nnodes=$((nnodes - engine_nodes))
engine_hosts=("${nodes[@]:trainer_nnodes}")
trainer_hosts=()
if ((engine_nodes)); then
  trainer_hosts=(-w "$(IFS=,; echo "${nodes[*]:0:trainer_nnodes}")")
  say "separate rollout engines on ${engine_hosts[*]}; the trainer on ${nodes[*]:0:trainer_nnodes}"
fi

# ---- 2. pyxis: the container on every node, before steps start concurrently ------------------------
if [[ $runtime == pyxis ]]; then
  run srun "${per_node[@]}" "${step_opts[@]}" true
fi

# ---- 3. Ray over the allocation, when the config needs it ------------------------------------------
if [[ ${NEMO_RLSR_NEEDS_RAY:-0} == 1 ]]; then
  # shellcheck source=ray_cluster.sh
  source "$REPO/slurm/ray_cluster.sh"
  start_ray_cluster
fi

# ---- 4. the trainer --------------------------------------------------------------------------------
command=train
[[ $mode == sft ]] && command=sft
entry=(-m nemo_rlsr.cli "$command" --config "$config" --resume auto "trainer.output_dir=$run_dir" "${overrides[@]}")
if [[ $launcher == torchrun ]]; then
  step=(srun --nodes="$trainer_nnodes" --ntasks="$trainer_nnodes" --ntasks-per-node=1 "${trainer_hosts[@]}"
    --kill-on-bad-exit=1 "${step_opts[@]}" --output="$log_dir/%N.log"
    bash "$workdir/slurm/node.sh" torchrun --nnodes="$trainer_nnodes" --nproc-per-node="$ranks_per_node"
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:$rdzv_port" --rdzv-id="$job_id"
    --max-restarts=0 "${entry[@]}")
else
  export MASTER_ADDR=$head_node MASTER_PORT=$rdzv_port
  step=(srun --nodes="$trainer_nnodes" --ntasks=$((trainer_nnodes * ranks_per_node)) --ntasks-per-node="$ranks_per_node"
    "${trainer_hosts[@]}" --kill-on-bad-exit=1 "${step_opts[@]}" --output="$log_dir/%N-%t.log"
    bash "$workdir/slurm/node.sh" task python3 "${entry[@]}")
fi
if ((dry_run)); then
  printf 'would run: '; show "${step[@]}"
  say "logs would go to $log_dir; on exit $PREEMPTED_EXIT_CODE or a new $run_dir/$PREEMPTED_MARKER: scontrol requeue $job_id"
  exit 0
fi

# ---- 5. run it; forward preemption signals as SIGUSR1; requeue a preempted run --------------------
touch "$log_dir/.started"
# shellcheck disable=SC2317,SC2329 # called from the traps below
forward() {
  say "received SIG$1: sending SIGUSR1 to the job step (the trainer checkpoints and exits $PREEMPTED_EXIT_CODE)"
  if [[ -n ${step_pid:-} ]]; then kill -s USR1 "$step_pid" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
show "${step[@]}"
"${step[@]}" &
step_pid=$!
status=0
while true; do
  wait "$step_pid" && status=0 || status=$?
  kill -0 "$step_pid" 2>/dev/null || break # still running: wait was interrupted by a signal
done
say "job step exited with $status"

marker=$run_dir/$PREEMPTED_MARKER
if ((status == PREEMPTED_EXIT_CODE)) || [[ -f $marker && $marker -nt $log_dir/.started ]]; then
  if ((attempt < ${NEMO_RLSR_MAX_REQUEUES:-20})); then
    say "preempted: requeueing job $job_id (attempt $((attempt + 1)))"
    scontrol requeue "$job_id"
    exit 0
  fi
  say "preempted, but requeued ${NEMO_RLSR_MAX_REQUEUES:-20} times already: giving up"
fi
exit "$status"
