"""Checkpoint layout, resume state, RNG and pruning around Strategy.save/load_checkpoint.

    output_dir/checkpoints/
      latest                 # tag of the newest *complete* checkpoint, written last, atomically
      step_40/               # DeepSpeed files (model states, ZeRO partitions, client state)
        rng_state_0.pt ...   # one per rank: python, numpy, torch (and cuda) generators
      step_50/

A run killed at any moment (SIGKILL) resumes from `latest`: a half-written step dir is never
pointed at, and older checkpoints are deleted only after the new one is complete.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.strategy import Strategy, agree_max, barrier, get_rank


@dataclass
class TrainState:
    """Where the loop stands; saved as DeepSpeed client_state."""
    step: int = 0            # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro batches of `epoch` already consumed (this rank's shard)
    stage: int = 0           # Coconut curriculum stage the optimizer state belongs to
    samples: int = 0         # global samples seen
    best_metric: float | None = None   # validation metric of the best checkpoint (train.eval_steps)
    best_step: int | None = None


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(root: str | Path) -> str | None:
    file = Path(root) / "latest"
    if not file.is_file():
        return None
    tag = file.read_text().strip()
    return tag if (Path(root) / tag).is_dir() else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(strategy: Strategy, output_dir: str | Path, state: TrainState, keep: int) -> Path:
    """Save on every rank (collective); then rank 0 points `latest` at it and prunes to `keep`."""
    root = checkpoint_root(output_dir)
    tag = f"step_{state.step}"
    (root / tag).mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), root / tag / f"rng_state_{get_rank()}.pt")
    strategy.save_checkpoint(str(root), tag, client_state={"train_state": asdict(state)})
    barrier()   # every rank's partitions are on disk before `latest` names them
    if get_rank() == 0:
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        _prune(root, keep, current=tag)
    barrier()
    return root / tag


BEST_FILE = "best"     # checkpoints/best: the tag of the best checkpoint by validation


def mark_best(output_dir: str | Path, tag: str) -> None:
    """Record `tag` as the best checkpoint (rank 0; after the checkpoint itself is complete)."""
    root = checkpoint_root(output_dir)
    tmp = root / f"{BEST_FILE}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, root / BEST_FILE)


def best_tag(output_dir: str | Path) -> str | None:
    """The best checkpoint's tag, when one is recorded and still on disk, as global rank 0 reads it.

    Rank 0 alone writes the file (after the others have moved on), so each rank reading it itself
    can see it missing or stale; a rank that then skips the load its peers run hangs ZeRO-3.
    """
    root = checkpoint_root(output_dir)
    file = root / BEST_FILE
    tag = file.read_text().strip() if file.is_file() else None
    tag = tag if tag and (root / tag).is_dir() else None
    return _from_rank0(tag)


def _prune(root: Path, keep: int, current: str) -> None:
    best = (root / BEST_FILE).read_text().strip() if (root / BEST_FILE).is_file() else None
    tags = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name.split("_")[-1].isdigit()
                   and p.name != best),              # the best checkpoint is never pruned
                  key=lambda p: int(p.name.split("_")[-1]))
    current_step = int(current.split("_")[-1])
    # Newer-numbered dirs are leftovers of a killed run that this run has overtaken or will redo.
    done = [p for p in tags if int(p.name.split("_")[-1]) <= current_step]
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def agreed_latest_tag(root: Path) -> str | None:
    """The tag global rank 0 reads in `latest`, on every rank.

    Each rank reading `latest` itself can disagree across nodes: another node's view of a shared
    filesystem may be older (NFS attribute caching after a quick restart), and ranks loading
    different steps diverge silently or hang in ZeRO's collectives.
    """
    return _from_rank0(latest_tag(root))


def _from_rank0(value):
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def load(strategy: Strategy, output_dir: str | Path, tag: str | None = None) -> TrainState | None:
    """Restore model, optimizer, scheduler and RNG from `latest` (or `tag`); None when there is none."""
    root = checkpoint_root(output_dir)
    tag = tag or agreed_latest_tag(root)
    if tag is None:
        return None
    # Every rank fails together (no rank left waiting in a collective) when one cannot see it.
    if agree_max(int(not (root / tag).is_dir())):
        raise FileNotFoundError(f"checkpoint {root / tag}, named by global rank 0's {root / 'latest'}, is missing "
                                f"on some rank: train.output_dir must be on a filesystem every node shares")
    client = strategy.load_checkpoint(str(root), tag)
    rng = root / tag / f"rng_state_{get_rank()}.pt"
    if rng.is_file():   # absent when resuming on a different number of ranks
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainState(**client["train_state"])
