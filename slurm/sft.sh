#!/usr/bin/env bash
#SBATCH --job-name=sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@540
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# SFT baseline (the paper's LR 3e-5), conf/sft_{qwen7b,llama8b,qwen32b}.yaml: the model is the first argument
#   sbatch slurm/sft.sh [qwen7b|llama8b] [--dry-run] [key=value ...]
#   sbatch --nodes=4 slurm/sft.sh qwen32b
# Runs `nemo-rlsr sft` (trainer/sft.py) from the model's HF checkpoint (model.hf_path), bf16.
set -euo pipefail
model=qwen7b
case ${1:-} in qwen7b | llama8b | qwen32b) model=$1; shift ;; esac
config=conf/sft_$model.yaml
if [[ -n ${CONFIG:-} && ${CONFIG#./} != "$config" ]]; then # CONFIG= is not read: say so, do not run another model
  wanted=$(basename "$CONFIG" .yaml)
  echo "sft.sh: CONFIG=$CONFIG is not read; name the model: sbatch slurm/sft.sh ${wanted#sft_}" >&2
  exit 2
fi
repo=${NEMO_RLSR_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
exec "$repo/slurm/launch.sh" --mode sft --config "$config" "$@"
