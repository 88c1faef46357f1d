#!/usr/bin/env bash
# The real embedding server the OpenAI-endpoint reward tests talk to: infinity-emb 0.0.78, which
# serves the OpenAI embeddings API (`POST /embeddings`) on CPU from a local sentence-transformers
# folder. It gets its own venv, as a deployment would: infinity-emb pins numpy<2 and
# sentence-transformers<4, which cannot share the trainer's environment.
#
#   tests/embedding_server/install.sh [VENV]   (default: .venv-embed-server at the repository root)
#
# Idempotent: a venv whose stamp matches this file's pins is kept. torch==2.13.0 (the CPU build) is
# installed first, so that the server's torch requirement does not pull the CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-embed-server}
PINS="infinity-emb[server,torch]==0.0.78"
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PINS" ] && "$VENV/bin/infinity_emb" --help >/dev/null 2>&1; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "$PINS"
"$VENV/bin/infinity_emb" --help >/dev/null
echo "$PINS" > "$STAMP"
