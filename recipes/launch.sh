#!/usr/bin/env bash
# Launch a recipe with the deepspeed launcher: one node (NUM_GPUS, default 8) or a hostfile.
#
#   bash recipes/launch.sh CONFIG.yaml [--hostfile FILE] [dotted overrides ...]
#
# Every argument after the config (and the optional hostfile) reaches the trainer as its own argv
# item ("$@"): nothing is evaluated by a shell. --no_local_rank: ranks come from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; shift
launcher=(deepspeed --no_local_rank)
if [[ "${1:-}" == "--hostfile" ]]; then
  launcher+=(--hostfile "$2"); shift 2
else
  launcher+=(--num_gpus "${NUM_GPUS:-8}")
fi
# The deepspeed launcher does not set it, and CPU-side work per rank is 10-30x slower without it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${launcher[@]}" --module pipeline.train --config "$config" "$@"
