#!/usr/bin/env bash
# CODI with GPT-2 on GSM8k-Aug: self-distillation from the explicit-CoT teacher into 6 latents.
# Config (hardware, memory per GPU, target accuracy): recipes/configs/gpt2_codi.yaml
#
#   deepspeed [--num_gpus N | --hostfile FILE] recipes/gpt2_codi.sh [--dry-run] [section.field=value ...]
#   bash recipes/gpt2_codi.sh [--num_gpus N | --hostfile FILE] [--dry-run] [section.field=value ...]
#
# One file read by two languages. `bash` runs the first block, which hands over to
# recipes/launch.sh (it starts the deepspeed launcher on the trainer). The deepspeed launcher runs
# its script argument as `python -u FILE` on every rank, so Python reads this same file: to Python
# the bash block is a string, and the block after it starts the trainer on this rank
# (pipeline/launch.py). Either way the config is recipes/configs/<this file's name>.yaml, found
# from this file's location (any working directory works), and each override stays one argv item.
''':'
exec bash "$(dirname -- "${BASH_SOURCE[0]}")/launch.sh" "${BASH_SOURCE[0]}" "$@"
: <<'# end of the bash part'
'''
import os
import sys

# The repository root, for a checkout that is not pip-installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.launch import recipe_rank_main  # noqa: E402

sys.exit(recipe_rank_main(__file__))
# end of the bash part
