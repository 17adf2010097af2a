#!/usr/bin/env bash
# Thin launcher for recipes/configs/qwen7b_softcot.yaml; arguments: [--hostfile FILE] [dotted overrides ...]
set -euo pipefail
exec bash "$(dirname "$0")/launch.sh" recipes/configs/qwen7b_softcot.yaml "$@"
