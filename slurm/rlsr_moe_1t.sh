#!/usr/bin/env bash
#SBATCH --job-name=rlsr-moe-1t
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@960
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# RLSR on the 1T-parameter MoE (Kimi-K2 shape, conf/rlsr_moe_1t.yaml), 64 nodes x 8 GPUs.
#   sbatch slurm/rlsr_moe_1t.sh [--dry-run] [key=value ...]   (submit from the repo root)
# The preemption warning covers a step and a save of the ~14 TB checkpoint (1T parameters with
# optimizer state; slurm/set_signal_lead.py). Add -p/-A and site settings on the sbatch line or in
# $NEMO_RLSR_SITE_ENV.
set -euo pipefail
repo=${NEMO_RLSR_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
exec "$repo/slurm/launch.sh" --config conf/rlsr_moe_1t.yaml "$@"
