"""What a recipe file runs on each rank when the deepspeed launcher starts it.

    deepspeed --num_gpus 8 recipes/llama8b_simcot.sh train.learning_rate=5e-5

The deepspeed launcher runs its script argument as `python -u recipes/llama8b_simcot.sh
[--local_rank=R] ARGS...` on every rank. Each `recipes/<name>.sh` is a bash/Python polyglot (see
the comment at its top): bash reads its first block and hands over to `recipes/launch.sh`, Python
reads its second block, which calls `recipe_rank_main` here. The recipe's config is the YAML named
like the file, `recipes/configs/<name>.yaml`, found from the file's own location, so the command
works from any directory; every other argument reaches the trainer unchanged, as its own argv item.

`--dry-run` (or DRY_RUN=1) prints the trainer command this rank would run, shell-quoted, and exits.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

# Options of the deepspeed launcher itself. Typed after the recipe they reach the ranks instead of
# the launcher (argparse.REMAINDER); say where they belong rather than fail on an odd config error.
LAUNCHER_OPTIONS = ("--num_gpus", "--num_nodes", "--hostfile", "--include", "--exclude", "--master_port",
                    "--master_addr", "--launcher", "--no_local_rank", "--module", "--bind_cores_to_rank")


class RecipeError(ValueError):
    """A recipe invocation the launcher cannot turn into a trainer command."""


def recipe_config(recipe: str | Path) -> Path:
    """recipes/<name>.sh → recipes/configs/<name>.yaml (absolute); a clear error when it is missing."""
    path = Path(recipe).resolve()
    config = path.parent / "configs" / f"{path.stem}.yaml"
    if not config.is_file():
        raise RecipeError(f"recipe {recipe}: its config {config} does not exist (a recipe file "
                          f"recipes/<name>.sh trains recipes/configs/<name>.yaml)")
    return config


def dry_run_requested(args: list[str], env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return "--dry-run" in args or env.get("DRY_RUN", "") not in ("", "0")


def trainer_args(recipe: str | Path, args: list[str]) -> list[str]:
    """The trainer's argv for one rank: `--config <recipe's YAML>` + the user's arguments.

    Drops `--dry-run` and the `--local_rank=R` the deepspeed launcher appends (ranks come from the
    environment); rejects launcher options typed after the recipe.
    """
    out: list[str] = []
    skip_next = False
    for i, arg in enumerate(args):
        if skip_next:
            skip_next = False
            continue
        if arg == "--dry-run":
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip_next = True
            continue
        if arg.split("=", 1)[0] in LAUNCHER_OPTIONS:
            raise RecipeError(f"argument {i + 1} {arg!r}: options of the deepspeed launcher go before the "
                              f"recipe (deepspeed {arg.split('=', 1)[0]} … {recipe} overrides…); after it "
                              f"only dotted overrides and --dry-run are accepted")
        out.append(arg)
    return ["--config", str(recipe_config(recipe)), *out]


def recipe_rank_main(recipe: str, args: list[str] | None = None) -> int:
    """Entry of a recipe file's Python part: start the trainer on this rank (or print its command)."""
    args = sys.argv[1:] if args is None else list(args)
    try:
        argv = trainer_args(recipe, args)
    except RecipeError as exc:
        print(f"recipe error: {exc}", file=sys.stderr)
        return 2
    if dry_run_requested(args):
        # Every rank would print the same line; rank 0 speaks for them.
        if os.environ.get("RANK", "0") == "0":
            print(shlex.join([sys.executable, "-m", "pipeline.train", *argv]), flush=True)
        return 0
    from pipeline.train import main
    return main(argv)
