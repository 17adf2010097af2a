#!/usr/bin/env bash
# Set up the CPU environment (idempotent) and run the whole test suite.
# Usage: bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
VENV="${VENV:-.venv}"
# Two workers (one per core); a test file stays on one worker, so its module fixtures run once.
exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
