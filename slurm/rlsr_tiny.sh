#!/usr/bin/env bash
#SBATCH --job-name=rlsr-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# The CPU demo (conf/rlsr_tiny.yaml) as a Slurm job: 2 trainer ranks (gloo) on one node, no GPU and
# no container (the bare runtime: the job's own Python environment). A first check of a cluster's
# Slurm setup, and what CI submits to its local Slurm (tests/test_slurm_cluster.py).
#   NEMO_RLSR_VENV=$PWD/.venv sbatch slurm/rlsr_tiny.sh [--dry-run] [key=value ...]   (from the repo root)
set -euo pipefail
repo=${NEMO_RLSR_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
export NEMO_RLSR_RUNTIME=${NEMO_RLSR_RUNTIME:-bare} NEMO_RLSR_GPU=${NEMO_RLSR_GPU:-cpu}
export NEMO_RLSR_RANKS_PER_NODE=${NEMO_RLSR_RANKS_PER_NODE:-2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$repo/slurm/launch.sh" --config conf/rlsr_tiny.yaml "$@"
