#!/usr/bin/env bash
#SBATCH --job-name=rlsr-qwen32b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@660
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# RLSR on Qwen2.5-32B (conf/rlsr_qwen32b_{sb,qwenem}.yaml), 8 nodes x 8 GPUs.
#   sbatch slurm/rlsr_qwen32b.sh [sb|qwenem] [--dry-run] [key=value ...]   (submit from the repo root)
# Add -p/-A and site settings on the sbatch line or in $NEMO_RLSR_SITE_ENV; see slurm/launch.sh.
set -euo pipefail
encoder=sb
case ${1:-} in sb | qwenem) encoder=$1; shift ;; esac
repo=${NEMO_RLSR_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
exec "$repo/slurm/launch.sh" --config "conf/rlsr_qwen32b_$encoder.yaml" "$@"
