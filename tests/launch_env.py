"""The environment for a child process that starts its own process group (torchrun, the deepspeed
launcher, or a plain single-process run).

An in-process run earlier in the pytest session leaves RANK/WORLD_SIZE/MASTER_PORT in os.environ
and still holds that port; a child inheriting them would join or clash with it.
"""
import os

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env
