#!/usr/bin/env bash
# Turn an image into the squashfs file that pyxis (`srun --container-image=FILE.sqsh`) runs.
#
#   containers/enroot_import.sh [--dry-run] IMAGE [OUT.sqsh]
#
# IMAGE: dockerd://nemo_rlsr:TAG (built here with containers/build.sh, taken from the local docker
# daemon) or a registry reference such as nvcr.io/nvidia/tensorrt-llm/release:1.2.0 or
# registry.example.com/team/nemo_rlsr:TAG, which is rewritten to enroot's docker://REGISTRY#PATH.
# Registry credentials come from enroot's own file (~/.config/enroot/.credentials; for nvcr.io:
# `machine nvcr.io login $oauthtoken password <NGC API key>`). Import once, on a login node, into
# a shared filesystem; every job then reads the same file (slurm/launch.sh: NEMO_RLSR_IMAGE).
set -euo pipefail
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
image=${1:?usage: enroot_import.sh [--dry-run] IMAGE [OUT.sqsh]}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${2:-$repo/containers/nemo_rlsr.sqsh}

first=${image%%/*}
if [[ $image == *://* ]]; then
  uri=$image # already an enroot URI (dockerd://, docker://, podman://)
elif [[ $image == */* && ($first == *.* || $first == *:* || $first == localhost) ]]; then
  uri="docker://$first#${image#*/}" # a registry host: enroot wants REGISTRY#PATH
else
  uri="docker://$image" # Docker Hub
fi
if ((dry_run)); then echo "would run: enroot import -o $out $uri"; exit 0; fi
[[ -e $out ]] && { echo "$out exists; remove it first" >&2; exit 1; }
enroot import -o "$out" "$uri"
