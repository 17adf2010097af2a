#!/usr/bin/env bash
# Thin launcher for recipes/configs/gpt2_coconut.yaml; arguments: [--hostfile FILE] [dotted overrides ...]
set -euo pipefail
exec bash "$(dirname "$0")/launch.sh" recipes/configs/gpt2_coconut.yaml "$@"
