#!/usr/bin/env bash
# Creates .venv and installs m2f with its dev extra. Safe to re-run: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned, so pip takes the local wheels instead of resolving a newer build.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/python -c "import m2f_model, transformers, moto, ray" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.m2f-installed ]; then
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.m2f-installed
fi
