#!/usr/bin/env bash
#SBATCH --job-name=rlsr-llama8b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@360
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# RLSR on Llama-3.1-8B (conf/rlsr_llama8b_{sb,qwenem}.yaml), 4 nodes x 8 GPUs.
#   sbatch slurm/rlsr_llama8b.sh [sb|qwenem] [--dry-run] [key=value ...]   (submit from the repo root)
# Add -p/-A and site settings on the sbatch line or in $NEMO_RLSR_SITE_ENV; see slurm/launch.sh.
set -euo pipefail
encoder=sb
case ${1:-} in sb | qwenem) encoder=$1; shift ;; esac
repo=${NEMO_RLSR_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
exec "$repo/slurm/launch.sh" --config "conf/rlsr_llama8b_$encoder.yaml" "$@"
