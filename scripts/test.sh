#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite, real Ray and S3 services included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
