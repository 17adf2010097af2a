#!/usr/bin/env bash
# The main job on its embedded default, end to end on CPU: set up .venv, then the quick study on the
# shipped chained-arithmetic task (pipeline/data/synthetic.py): No-CoT, CoT-SFT, CODI and CODI+SIM-CoT
# on a tiny LLaMA, each trained → selected on `valid` → exported → evaluated on `test` by the harness
# → reported (runs/demo/results.md, summary.json, PNG plots, SIM-CoT's decoded latents).
#
# Usage: bash scripts/demo.sh [latent-study options, e.g. --methods nocot,cot] [-- dotted overrides]
# OUT=runs/x picks another output directory. A rerun skips the finished cells.
# Arguments reach latent-study as separate argv items, never through a shell string.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
VENV="${VENV:-.venv}"
OUT="${OUT:-runs/demo}"

"$VENV/bin/latent-study" --data chain --out "$OUT" --quick "$@"
# One SIM-CoT cell's latents, decoded by its step decoder next to the reference steps.
report="$OUT/runs/simcot/seed0/latents/latent_report.md"
if [[ -f "$report" ]]; then
  echo
  echo "== what SIM-CoT's latents say: $report (first problems) =="
  head -n 30 "$report"
fi
