#!/usr/bin/env bash
# Start a recipe with the deepspeed launcher, on one node or on the hosts of a hostfile.
#
#   bash recipes/launch.sh RECIPE.sh|CONFIG.yaml [launcher options] [--dry-run] [--] [dotted overrides ...]
#
#   launcher options (passed to deepspeed): --num_gpus N, --num_nodes N, --hostfile FILE,
#     --include S, --exclude S, --master_addr A, --master_port P, --launcher pdsh|openmpi|slurm|...
#     (also as --opt=value). Without --num_gpus/--hostfile/--include: NUM_GPUS when set, else
#     every GPU of this node (deepspeed's default).
#   --dry-run (or DRY_RUN=1): print the final command, shell-quoted, and exit.
#   DEEPSPEED: the launcher executable (default: deepspeed on PATH).
#
# The recipe files (recipes/<name>.sh) call this with their own path; recipes/configs/<name>.yaml
# is the config. Every argument after the options reaches the trainer as its own argv item ("$@"):
# nothing is evaluated by a shell, so values with spaces or metacharacters arrive literally.
# The working directory is kept: relative paths in overrides mean what the user typed them to mean.
set -euo pipefail

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 ]] || usage
recipes_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname -- "$recipes_dir")"

target="$1"; shift
case "$target" in
  *.sh) config="$recipes_dir/configs/$(basename -- "$target" .sh).yaml" ;;
  *.yaml|*.yml) config="$target" ;;
  -h|--help) usage ;;
  *) echo "launch.sh: first argument must be a recipe (.sh) or a config (.yaml), got '$target'" >&2; exit 2 ;;
esac
if [[ ! -f "$config" ]]; then
  echo "launch.sh: config $config does not exist" >&2
  exit 2
fi

launcher=("${DEEPSPEED:-deepspeed}")
placed=false          # true once the user chose the ranks (--num_gpus, --hostfile, --include)
dry_run=false
[[ "${DRY_RUN:-0}" != "0" && -n "${DRY_RUN:-}" ]] && dry_run=true
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_gpus|--hostfile|--include|--num_nodes|--exclude|--master_addr|--master_port|--launcher)
      [[ $# -ge 2 ]] || { echo "launch.sh: $1 needs a value" >&2; exit 2; }
      [[ "$1" =~ ^--(num_gpus|hostfile|include)$ ]] && placed=true
      launcher+=("$1" "$2"); shift 2 ;;
    --num_gpus=*|--hostfile=*|--include=*)
      placed=true; launcher+=("$1"); shift ;;
    --num_nodes=*|--exclude=*|--master_addr=*|--master_port=*|--launcher=*)
      launcher+=("$1"); shift ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    --*) echo "launch.sh: unknown option $1 (overrides look like section.field=value)" >&2; exit 2 ;;
    *) break ;;
  esac
done
# --dry-run can never be an override (those are key=value), so it is honoured anywhere.
overrides=()
for arg in "$@"; do
  if [[ "$arg" == --dry-run ]]; then dry_run=true; else overrides+=("$arg"); fi
done
if [[ "$placed" == false && -n "${NUM_GPUS:-}" ]]; then
  launcher+=(--num_gpus "$NUM_GPUS")
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment. --module: the trainer is imported
# from PYTHONPATH below, so no installation and no particular working directory are needed.
cmd=("${launcher[@]}" --no_local_rank --module pipeline.train --config "$config" "${overrides[@]}")

# The deepspeed launcher does not set it, and CPU-side work per rank is 10-30x slower without it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The deepspeed launcher exports PYTHON* variables to the other nodes of a hostfile too.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$dry_run" == true ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
