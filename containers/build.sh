#!/usr/bin/env bash
# Build the nemo_rlsr image from the Dockerfile at the repository root.
#
#   containers/build.sh [--tag NAME:TAG] [--base IMAGE] [--push] [--dry-run]
#
# Default tag nemo_rlsr:<git short hash>; default base the Dockerfile's (TensorRT-LLM 1.2.0).
# Pulling nvcr.io images needs `docker login nvcr.io` (user $oauthtoken, an NGC API key).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag="nemo_rlsr:$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo dev)"
base="" push=0 dry_run=0
while (($#)); do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --push) push=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cmd=(docker build -f "$repo/Dockerfile" -t "$tag")
[[ -n $base ]] && cmd+=(--build-arg "BASE_IMAGE=$base")
cmd+=("$repo")
if ((dry_run)); then echo "would run: ${cmd[*]}"; else "${cmd[@]}"; fi
if ((push)); then
  if ((dry_run)); then echo "would run: docker push $tag"; else docker push "$tag"; fi
fi
echo "next: containers/enroot_import.sh dockerd://$tag   (or push it and import from the registry)"
