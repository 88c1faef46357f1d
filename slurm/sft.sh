#!/usr/bin/env bash
#SBATCH --job-name=sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# SFT baseline (the paper's LR 3e-5), conf/sft_{qwen7b,llama8b,qwen32b}.yaml:
#   sbatch slurm/sft.sh [qwen7b|llama8b] [--dry-run] [key=value ...]
#   sbatch --nodes=4 slurm/sft.sh qwen32b
# Runs `nemo-rlsr sft` (trainer/sft.py).
set -euo pipefail
model=qwen7b
case ${1:-} in qwen7b | llama8b | qwen32b) model=$1; shift ;; esac
repo=${NEMO_RLSR_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
exec "$repo/slurm/launch.sh" --mode sft --config "conf/sft_$model.yaml" "$@"
