#!/usr/bin/env bash
# Turn an image into the squashfs file that pyxis (`srun --container-image=FILE.sqsh`) runs.
#
#   containers/enroot_import.sh [--dry-run] IMAGE [OUT.sqsh]
#
# IMAGE: dockerd://nemo_rlsr:TAG (built here with containers/build.sh, taken from the local docker
# daemon) or a registry reference such as nvcr.io/nvidia/tensorrt-llm/release:1.2.0 or
# registry.example.com/team/nemo_rlsr:TAG, which is rewritten to enroot's docker://REGISTRY#PATH.
# Registry credentials come from enroot's own file, $ENROOT_CONFIG_PATH/.credentials (default
# ~/.config/enroot/.credentials). For nvcr.io enroot needs both NGC endpoints there (enroot
# doc/cmd/import.md), which this script checks before a long import fails half way:
#   machine nvcr.io login $oauthtoken password <NGC API key>
#   machine authn.nvidia.com login $oauthtoken password <NGC API key>
# Import once, on a login node, into a shared filesystem; every job then reads the same file
# (slurm/launch.sh: NEMO_RLSR_IMAGE).
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
if [[ $uri == docker://nvcr.io#* || $uri == docker://*@nvcr.io#* ]]; then
  credentials=${ENROOT_CONFIG_PATH:-${XDG_CONFIG_HOME:-$HOME/.config}/enroot}/.credentials
  missing=()
  for host in nvcr.io authn.nvidia.com; do
    grep -Eq "^[[:space:]]*machine[[:space:]]+${host//./\\.}([[:space:]]|$)" "$credentials" 2>/dev/null || missing+=("$host")
  done
  if ((${#missing[@]})); then
    echo "enroot_import.sh: $credentials lacks the NGC line(s) enroot needs to pull from nvcr.io:" >&2
    # shellcheck disable=SC2016 # $oauthtoken is literal: enroot's NGC user name
    printf '  machine %s login $oauthtoken password <NGC API key>\n' "${missing[@]}" >&2
    exit 1
  fi
fi
if ((dry_run)); then echo "would run: enroot import -o $out $uri"; exit 0; fi
[[ -e $out ]] && { echo "$out exists; remove it first" >&2; exit 1; }
enroot import -o "$out" "$uri"
