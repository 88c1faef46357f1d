#!/usr/bin/env bash
# The one launcher behind slurm/rlsr_*.sh and slurm/sft.sh (run as the batch script, via exec).
#
#   launch.sh --config conf/X.yaml [--mode rlsr|sft] [--launcher torchrun|srun] [--dry-run] [key=value ...]
#
# 1. preflight: `nemo-rlsr plan` at this allocation's size; a config that does not fit stops here
# 2. a Ray cluster over the allocation when the plan says the config needs one (TensorRT-LLM
#    rollouts or the Ray reward pool)
# 3. the trainer: one `torchrun` per node (c10d rendezvous on the first node), inside the container
# 4. preemption: SIGUSR1 (`#SBATCH --signal=B:USR1@300`) or SIGTERM reaching this shell is
#    forwarded to the job step; the trainer saves a checkpoint and exits PREEMPTED_EXIT_CODE
#    (or leaves $RUN_DIR/preempted.json, since torchrun turns worker exit codes into 1) and this
#    script requeues the job, which resumes with `--resume auto`.
# --dry-run prints every command instead of running it (the preflight still runs, locally).
#
# Environment (defaults in brackets):
#   NEMO_RLSR_IMAGE     container squashfs [$REPO/containers/nemo_rlsr.sqsh] (containers/enroot_import.sh)
#   NEMO_RLSR_MOUNTS    extra pyxis mounts [/data:/data:ro,/models:/models:ro]
#   NEMO_RLSR_RUNS      runs root [$REPO/runs]; NEMO_RLSR_RUN_DIR [$NEMO_RLSR_RUNS/<config name>]
#   NEMO_RLSR_GPU       h100-80gb | h200-141gb for the preflight [the config's cluster.gpu]
#   NEMO_RLSR_SITE_ENV  a file sourced first (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...; slurm/site.env.example)
#   NEMO_RLSR_MAX_REQUEUES [20]; NEMO_RLSR_PYTHON [python3] runs the --dry-run preflight locally
set -euo pipefail

PREEMPTED_EXIT_CODE=75 # nemo_rlsr/trainer/preemption.py; tests/test_slurm.py checks they agree
PREEMPTED_MARKER=preempted.json
CONTAINER_REPO=/workspace/nemo_rlsr

config="" mode=rlsr launcher=torchrun dry_run=0 overrides=()
while (($#)); do
  case $1 in
    --config) config=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --launcher) launcher=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
[[ -n $config ]] || { echo "launch.sh: --config is required" >&2; exit 2; }
[[ $mode == rlsr || $mode == sft ]] || { echo "launch.sh: --mode rlsr|sft" >&2; exit 2; }
[[ $launcher == torchrun || $launcher == srun ]] || { echo "launch.sh: --launcher torchrun|srun" >&2; exit 2; }

REPO=${NEMO_RLSR_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=/dev/null
[[ -n ${NEMO_RLSR_SITE_ENV:-} ]] && source "$NEMO_RLSR_SITE_ENV"

# ---- the allocation ------------------------------------------------------------------------------
job_id=${SLURM_JOB_ID:-dry-run}
nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
gpus_per_node=${gpus_per_node%%(*} # "8(IDX:0-7)" on some Slurm versions
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
image=${NEMO_RLSR_IMAGE:-$REPO/containers/nemo_rlsr.sqsh}
# The recipes read /data and /models: point NEMO_RLSR_MOUNTS at where they are on this cluster.
extra_mounts=${NEMO_RLSR_MOUNTS-/data:/data:ro,/models:/models:ro}
mounts="$REPO:$CONTAINER_REPO,$run_dir:$run_dir${extra_mounts:+,$extra_mounts}"
container=(--container-image="$image" --container-mounts="$mounts" --container-workdir="$CONTAINER_REPO"
  --container-name="nemo_rlsr_$job_id" --no-container-mount-home)

# ---- NCCL and friends (pyxis passes this environment into the container) ---------------------------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1} # fail fast, not hang
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1} # megatron's TP/SP overlap order
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}                       # tolerate a congested fabric
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}                       # NVLS buffers cost GPU memory
export PYTHONPATH=$CONTAINER_REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 # compute nodes read models from local paths only
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

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
run_background() { # the same for a long-running step; its output goes to $log_dir/NAME.log
  local name=$1
  shift
  if ((dry_run)); then printf 'would run: '; show "$@"; else show "$@"; "$@" >"$log_dir/$name.log" 2>&1 & fi
}

if ((dry_run)); then
  say "DRY RUN: job $job_id, $nnodes node(s) x $gpus_per_node GPUs: ${nodes[*]}"
else
  mkdir -p "$log_dir"
  exec > >(tee -a "$log_dir/launch.log") 2>&1
  say "job $job_id attempt $attempt, $nnodes node(s) x $gpus_per_node GPUs: ${nodes[*]}"
fi

IFS=, read -ra mount_list <<<"$extra_mounts"
for m in "${mount_list[@]}"; do
  [[ -e ${m%%:*} ]] || say "warning: mount source ${m%%:*} does not exist here (set NEMO_RLSR_MOUNTS)"
done

# ---- 1. preflight: does the config fit this allocation? -------------------------------------------
plan_args=(plan --config "$config" --mode "$mode" --nodes "$nnodes" --gpus-per-node "$gpus_per_node")
[[ -n ${NEMO_RLSR_GPU:-} ]] && plan_args+=(--gpu "$NEMO_RLSR_GPU")
if ((dry_run)); then
  env_file=$(mktemp)
  trap 'rm -f "$env_file"' EXIT
  printf 'would run: '
  show srun --nodes=1 --ntasks=1 "${container[@]}" nemo-rlsr "${plan_args[@]}" --launch-env "$log_dir/launch.env" "${overrides[@]}"
  say "preflight (locally, with ${NEMO_RLSR_PYTHON:-python3}):"
  (cd "$REPO" && "${NEMO_RLSR_PYTHON:-python3}" -m nemo_rlsr.cli "${plan_args[@]}" --launch-env "$env_file" "${overrides[@]}") ||
    { say "preflight refused $config: it does not fit $nnodes node(s) x $gpus_per_node GPUs (see above)"; exit 1; }
else
  env_file=$log_dir/launch.env
  srun --nodes=1 --ntasks=1 "${container[@]}" nemo-rlsr "${plan_args[@]}" --launch-env "$env_file" "${overrides[@]}" |
    tee "$log_dir/plan.txt" ||
    { say "preflight refused $config: it does not fit $nnodes node(s) x $gpus_per_node GPUs (see $log_dir/plan.txt)"; exit 1; }
fi
# shellcheck source=/dev/null
source "$env_file"

# ---- 2. Ray over the allocation, when the config needs it ------------------------------------------
if [[ ${NEMO_RLSR_NEEDS_RAY:-0} == 1 ]]; then
  ray_port=${NEMO_RLSR_RAY_PORT:-6379}
  export RAY_ADDRESS=$head_node:$ray_port
  say "starting Ray: head $head_node, $((nnodes - 1)) worker node(s)"
  ray_opts=(--num-gpus="$gpus_per_node" --block --disable-usage-stats)
  head=(srun --overlap --nodes=1 --ntasks=1 -w "$head_node" "${container[@]}"
    ray start --head --port="$ray_port" "${ray_opts[@]}")
  run_background ray-head "${head[@]}"
  if ((nnodes > 1)); then
    workers=(srun --overlap --nodes=$((nnodes - 1)) --ntasks-per-node=1 --exclude="$head_node" "${container[@]}"
      ray start --address="$RAY_ADDRESS" "${ray_opts[@]}")
    run_background ray-workers "${workers[@]}"
  fi
  # shellcheck disable=SC2016 # $(seq ...) is for the inner shell
  run srun --overlap --nodes=1 --ntasks=1 -w "$head_node" "${container[@]}" \
    bash -c 'for _ in $(seq 60); do ray status >/dev/null 2>&1 && exit 0; sleep 5; done; exit 1'
fi

# ---- 3. the trainer --------------------------------------------------------------------------------
if [[ $mode == rlsr ]]; then
  entry=(-m nemo_rlsr.cli train --config "$config" --resume auto)
else
  entry=(-m nemo_rlsr.cli sft --config "$config" --resume auto)
fi
entry+=("trainer.output_dir=$run_dir" "${overrides[@]}")
if [[ $launcher == torchrun ]]; then
  step=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 "${container[@]}" --output="$log_dir/%N.log"
    bash "$CONTAINER_REPO/slurm/node.sh" torchrun --nnodes="$nnodes" --nproc-per-node="$gpus_per_node"
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:${NEMO_RLSR_RDZV_PORT:-29500}" --rdzv-id="$job_id"
    --max-restarts=0 "${entry[@]}")
else
  export MASTER_ADDR=$head_node MASTER_PORT=${NEMO_RLSR_RDZV_PORT:-29500}
  step=(srun --nodes="$nnodes" --ntasks-per-node="$gpus_per_node" --kill-on-bad-exit=1 "${container[@]}"
    --output="$log_dir/%N-%t.log" bash "$CONTAINER_REPO/slurm/node.sh" task python "${entry[@]}")
fi
if ((dry_run)); then
  printf 'would run: '; show "${step[@]}"
  say "logs would go to $log_dir; on exit $PREEMPTED_EXIT_CODE or a new $run_dir/$PREEMPTED_MARKER: scontrol requeue $job_id"
  exit 0
fi

# ---- 4. run it; forward preemption signals; requeue a preempted run ---------------------------------
touch "$log_dir/.started"
# shellcheck disable=SC2317 # called from the traps below
forward() {
  say "received SIG$1: forwarding to the job step (the trainer checkpoints and exits $PREEMPTED_EXIT_CODE)"
  if [[ -n ${step_pid:-} ]]; then kill -s "$1" "$step_pid" 2>/dev/null || true; fi
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
