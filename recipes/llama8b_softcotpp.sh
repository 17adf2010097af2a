#!/usr/bin/env bash
# Thin launcher for recipes/configs/llama8b_softcotpp.yaml; arguments: [--hostfile FILE] [dotted overrides ...]
set -euo pipefail
exec bash "$(dirname "$0")/launch.sh" recipes/configs/llama8b_softcotpp.yaml "$@"
