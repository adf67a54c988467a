#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and labels samples/ with the default model into out/samples-run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python jobs/segment_bucket.py "$@"
