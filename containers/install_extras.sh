#!/usr/bin/env bash
# Install containers/requirements.txt into an NGC image without replacing anything it ships.
#
#   install_extras.sh REQUIREMENTS BASE_CONSTRAINTS
#
# BASE_CONSTRAINTS is `pip list --format=freeze` of the untouched image. Packages the image
# already has are skipped (its version wins, e.g. omegaconf from TensorRT-LLM); the rest install
# with the frozen list as pip constraints, so a dependency that would need another torch or
# transformers fails the build instead of silently replacing them. megatron-core goes in with
# --no-deps (its torch pin must never reach pip's resolver).
set -euo pipefail
requirements=${1:?usage: install_extras.sh REQUIREMENTS BASE_CONSTRAINTS}
constraints=${2:?usage: install_extras.sh REQUIREMENTS BASE_CONSTRAINTS}
missing=$(mktemp)
trap 'rm -f "$missing"' EXIT

python - "$requirements" >"$missing" <<'PY'
import importlib.metadata as md
import re
import sys

for line in open(sys.argv[1]):
    requirement = line.split("#")[0].strip()
    if not requirement:
        continue
    name = re.split(r"[\[=<>!~; ]", requirement)[0]
    try:
        print(f"kept from the image: {name}=={md.version(name)} (wanted {requirement})", file=sys.stderr)
    except md.PackageNotFoundError:
        print(requirement)
PY

if grep -q '^megatron-core' "$missing"; then
  python -m pip install --no-deps "$(grep '^megatron-core' "$missing")"
fi
grep -v '^megatron-core' "$missing" >"$missing.rest" || true
if [[ -s $missing.rest ]]; then
  python -m pip install -c "$constraints" -r "$missing.rest"
fi
rm -f "$missing.rest"
