#!/usr/bin/env bash
# Evaluation sweeps of a recipe's export with the harness (latent-eval), as the papers report them.
#
#   bash recipes/evaluate.sh RECIPE [--model EXPORT] [--out DIR] [--sweep benchmarks|latents]
#                            [--num_gpus N] [--dry-run] [-- extra latent-eval run arguments ...]
#
#   --sweep benchmarks (default): every benchmark the paper reports for that model, at the trained
#       latent count, over SEEDS (default 41-45; mean ± std in results.md).
#   --sweep latents: GSM8k-Aug test at LATENTS latent counts (default 1,2,3,4,5,6), seed 41.
#   --model: default runs/RECIPE/export (the recipe's output_dir, relative to this directory).
#   --out: default runs/RECIPE/eval_<sweep>. --num_gpus N (or NUM_GPUS) > 1: data parallel under
#       torchrun, one shard per GPU. --dry-run (or DRY_RUN=1): print the command and exit.
#   PYTHON / TORCHRUN: the interpreter / torchrun to use (default: python3 / torchrun on PATH).
#
# Greedy decoding (every recipe but SoftCoT) gives the same text for every seed, so its
# five seeds repeat one number (std 0); they are kept so every table has the same shape as the
# sampled SoftCoT ones. SEEDS=41 skips the repeats.
set -euo pipefail

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && "$1" != -* ]] || usage
recipes_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
recipe="$(basename -- "$1" .sh)"; shift
[[ -f "$recipes_dir/$recipe.sh" ]] || { echo "evaluate.sh: no recipe recipes/$recipe.sh" >&2; exit 2; }

model="runs/$recipe/export" out="" sweep=benchmarks num_gpus="${NUM_GPUS:-1}"
dry_run=false
[[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != "0" ]] && dry_run=true
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model|--out|--sweep|--num_gpus)
      [[ $# -ge 2 ]] || { echo "evaluate.sh: $1 needs a value" >&2; exit 2; }
      case "$1" in --model) model="$2" ;; --out) out="$2" ;; --sweep) sweep="$2" ;; --num_gpus) num_gpus="$2" ;; esac
      shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    *) echo "evaluate.sh: unknown argument $1 (latent-eval arguments go after --)" >&2; exit 2 ;;
  esac
done
out="${out:-runs/$recipe/eval_$sweep}"

# What each paper reports for the model: GSM8k-Aug in domain plus GSM-Hard, MultiArith and SVAMP
# out of domain (CODI and SIM-CoT tables; MultiArith comes from the hub when no file is given);
# SoftCoT: GSM8K (sampled, seeds 41-45) and the other reasoning sets it reports that the harness
# has (AQuA, StrategyQA; ASDiv-Aug and Date Understanding are not shipped).
case "$recipe" in
  *softcot*) args=(--adapter softcot --do-sample --temperature 1.0 --top-p 1.0 --dtype bf16)
             benchmarks=gsm8k,aqua,strategyqa ;;
  gpt2_*)    args=(--adapter latent --dtype fp32)    # also CoT/No-CoT: the export knows its prompt format
             benchmarks=gsm8k_aug,gsm_hard,multiarith,svamp ;;
  *)         args=(--adapter latent --dtype bf16)
             benchmarks=gsm8k_aug,gsm_hard,multiarith,svamp ;;
esac
case "$sweep" in
  benchmarks) args+=(--benchmarks "$benchmarks" --seeds "${SEEDS:-41-45}") ;;
  latents)
    [[ "$recipe" == *softcot* || "$recipe" == gpt2_cot || "$recipe" == gpt2_nocot ]] && {
      echo "evaluate.sh: $recipe has no latent count to sweep" >&2; exit 2; }
    args+=(--benchmarks gsm8k_aug --num-latents "${LATENTS:-1,2,3,4,5,6}" --seeds 41) ;;
  *) echo "evaluate.sh: --sweep must be benchmarks or latents, got $sweep" >&2; exit 2 ;;
esac

if [[ "$num_gpus" -gt 1 ]]; then
  cmd=("${TORCHRUN:-torchrun}" --standalone --nproc-per-node "$num_gpus" -m evaluation.cli run)
else
  cmd=("${PYTHON:-python3}" -m evaluation.cli run)
fi
cmd+=(--model "$model" "${args[@]}" --batch-size 64 --out "$out" "$@")
repo="$(dirname -- "$recipes_dir")"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"    # the harness runs from a plain checkout too
if [[ "$dry_run" == true ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
