#!/usr/bin/env bash
# One-GPU check (issue 12.6): flash-attention-2 vs sdpa on the latent rollout, bf16 CoT-SFT / CODI /
# SIM-CoT steps on a Llama-3.2-1B-shaped model (tokens/s, step ratios, MFU, peak memory vs the
# planner), NCCL all-reduce. JSON to --out (default runs/gpu_check/gpu_check.json) and stdout.
#
#   bash scripts/gpu_check.sh [--steps 5] [--peak-tflops 989] [--out FILE]
#   bash scripts/gpu_check.sh --cpu-smoke       # CI: the same code at tiny size on CPU
#
# Exits 2 at once without CUDA (unless --cpu-smoke), 1 when a check fails or is skipped for time;
# a GPU run is killed after 8 minutes (the JSON is rewritten after every phase, so a killed run
# still leaves what it measured).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
case " $* " in
  *" --cpu-smoke "*) exec "$PY" scripts/gpu_check.py "$@" ;;     # CI: a slow machine is no failure
  *) exec timeout --signal=TERM --kill-after=15 480 "$PY" scripts/gpu_check.py "$@" ;;
esac
