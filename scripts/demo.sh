#!/usr/bin/env bash
# The main job on its embedded default, end to end on CPU:
#   set up .venv → train (tiny LLaMA, CoT-SFT, shipped GSM8k-Aug slice) → export → evaluate → report.
# Usage: bash scripts/demo.sh [dotted overrides, e.g. method.name=codi train.max_steps=30]
# Arguments are passed to the trainer as separate argv items, never through a shell string.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
VENV="${VENV:-.venv}"
OUT="${OUT:-runs/demo}"

"$VENV/bin/latent-train" train.output_dir="$OUT" "$@"
"$VENV/bin/latent-eval" run --adapter latent --model "$OUT/export" \
  --benchmarks "gsm8k_aug=tests/fixtures/gsm8k_aug_test.txt" --seeds 41 --batch-size 16 \
  --out "$OUT/eval"
echo
echo "== report: $OUT/eval/results.md =="
cat "$OUT/eval/results.md"
