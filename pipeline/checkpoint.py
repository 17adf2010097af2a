"""Checkpoints that survive a kill at any moment and never lose progress silently.

    output_dir/checkpoints/
      latest          tag of the newest committed checkpoint, written last (a hint: see below)
      best            tag of the best checkpoint by validation (mark_best); never pruned
      step_40/        one committed checkpoint (files: pipeline/checkpoint_files.py)
      .tmp-step_50/   a save in progress, or one a kill interrupted: never read, removed by the next save

Saving (collective): every rank writes its files into .tmp-step_N; after a barrier rank 0 lists
them and every rank checksums a share; rank 0 merges the manifest, renames the directory to
step_N (the commit point), rechecks it, writes `latest`, then prunes. A kill before the rename
leaves only a .tmp dir; a kill after it leaves a complete step_N.

Resuming (`resume_tag`, collective, before any model loads): the newest step_N whose manifest
verifies, so a checkpoint committed just before a kill that beat `latest` is used, and a damaged
one is skipped with a warning naming the file. A file holding pickled objects outside DeepSpeed's
types stops the run (CheckpointError). Checkpoints that exist but none intact also stop it:
starting over then needs `train.resume=false`, which moves them aside rather than mixing runs.
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline import checkpoint_files as files
from pipeline.checkpoint_files import REFUSED, CheckpointError
from pipeline.strategy import Strategy, agree_max, barrier, get_rank, get_world_size

TMP_PREFIX, REPLACED_PREFIX = ".tmp-", ".replaced-"
_TAG = re.compile(r"step_(\d+)")

__all__ = ["CheckpointError", "TrainState", "best_tag", "checkpoint_root", "latest_tag", "load", "mark_best",
           "resume_tag", "save"]


@dataclass
class TrainState:
    """Where the loop stands; train_state.json of each checkpoint."""
    step: int = 0            # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro batches of `epoch` already consumed (this rank's shard)
    stage: int = 0           # Coconut curriculum stage the optimizer state belongs to
    samples: int = 0         # global samples seen
    best_metric: float | None = None   # validation metric of the best checkpoint (train.eval_steps)
    best_step: int | None = None


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step(tag: str) -> int:
    return int(tag.split("_")[1])


def _committed(root: Path) -> list[str]:
    """step_N directories, oldest first (whether intact or not)."""
    return sorted((p.name for p in root.glob("step_*") if p.is_dir() and _TAG.fullmatch(p.name)), key=_step)


def _read_tag(file: Path) -> str | None:
    """The tag a `latest` / `best` file names, None when absent or not a tag."""
    if not file.is_file():
        return None
    tag = file.read_text(errors="replace").strip()
    return tag if _TAG.fullmatch(tag) else None


def latest_tag(root: str | Path) -> str | None:
    tag = _read_tag(Path(root) / "latest")
    return tag if tag and (Path(root) / tag).is_dir() else None


def best_tag(root: str | Path) -> str | None:
    """The checkpoint `mark_best` named (pruning keeps it), None when there is none."""
    return _read_tag(Path(root) / "best")


def agreed_best_tag(output_dir: str | Path) -> str | None:
    """The best checkpoint still on disk, as global rank 0 sees it, on every rank (collective).

    Rank 0 alone writes `best`, after the others have moved on: a rank reading it itself can see it
    missing or stale, and a rank that then skips the load its peers run hangs ZeRO-3.
    """
    root = checkpoint_root(output_dir)
    tag = best_tag(root)
    return _from_rank0(tag if tag and (root / tag).is_dir() else None)


def _from_rank0(value):
    """Global rank 0's `value` on every rank: ranks on different nodes can see different states of
    a shared filesystem (NFS attribute caching), and must still act alike."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def mark_best(output_dir: str | Path, tag: str) -> None:
    """Record `tag` (a committed checkpoint) as the best by validation. Rank 0 writes; any rank may call."""
    root = checkpoint_root(output_dir)
    if not (_TAG.fullmatch(tag) and (root / tag).is_dir()):
        raise ValueError(f"mark_best: {root / tag} is not a committed checkpoint")
    if get_rank() == 0:
        files.write_text(root / "best", tag)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- save

def save(strategy: Strategy, output_dir: str | Path, state: TrainState, keep: int) -> Path:
    """Save on every rank (collective): temp dir, manifest, rename, `latest`, then prune to `keep`."""
    root = checkpoint_root(output_dir)
    rank, world = get_rank(), get_world_size()
    tag = f"step_{state.step}"
    tmp = root / f"{TMP_PREFIX}{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"{REPLACED_PREFIX}*")]:
            shutil.rmtree(stale)        # a killed save's leftovers: never a checkpoint
        tmp.mkdir()
    barrier()
    files.save_rng(tmp / f"rng_state_{rank}.safetensors")
    if rank == 0:
        files.write_json(tmp / files.TRAIN_STATE, asdict(state))
    strategy.save_checkpoint(str(root), tmp.name)
    barrier()                           # every rank's files are on disk
    if rank == 0:
        files.write_file_list(tmp)
    barrier()
    files.write_manifest_part(tmp, rank, world)
    barrier()                           # every share is checksummed
    error = None
    if rank == 0:
        try:
            files.merge_manifest(tmp, world)
            _commit(root, tmp, root / tag)
            problems = files.verify(root / tag, checksums=False)
            if problems:                # never prune (or point `latest`) on an unverified checkpoint
                raise CheckpointError(f"checkpoint {root / tag} failed verification after saving: {problems[0][1]}")
            files.write_text(root / "latest", tag)
            files.fsync_dir(root)
            _prune(root, keep, current=tag)
        except (OSError, CheckpointError) as exc:
            error = exc
    # Also the closing barrier: the other ranks learn of a failed commit instead of waiting on rank 0.
    if agree_max(int(error is not None)):
        raise error or CheckpointError(f"checkpoint {root / tag}: rank 0 could not commit it (see its error)")
    return root / tag


def _commit(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished temp dir into place. A same-named older dir (a damaged one a resume
    skipped) is moved aside first and deleted after, since a directory cannot be renamed onto."""
    old = None
    if final.exists():
        old = root / f"{REPLACED_PREFIX}{final.name}"
        final.rename(old)
    tmp.rename(final)
    files.fsync_dir(root)
    if old is not None:
        shutil.rmtree(old)


def _prune(root: Path, keep: int, current: str) -> None:
    """Keep the `keep` newest intact checkpoints up to `current` plus the best one; delete the rest
    up to `current` (damaged ones too). Newer-numbered dirs are damaged ones a resume skipped:
    the run overwrites them when it gets there."""
    done = [t for t in _committed(root) if _step(t) <= _step(current)]
    intact = [t for t in done if not files.verify(root / t, checksums=False)]
    kept = set(intact[-keep:]) | {best_tag(root)}
    for tag in done:
        if tag not in kept:
            shutil.rmtree(root / tag, ignore_errors=True)


# --------------------------------------------------------------------------- resume

def resume_tag(output_dir: str | Path, resume: bool = True) -> str | None:
    """The checkpoint to resume from (collective; every rank gets the same answer), None to start.

    Raises CheckpointError when checkpoints exist but none is intact, or when one holds a refused
    file. With resume=False existing checkpoints are moved aside to checkpoints.replaced-<time>.
    """
    root = checkpoint_root(output_dir)
    rank, world = get_rank(), get_world_size()
    tags = _from_rank0(_committed(root) if root.is_dir() else [])   # one list, walked alike by all ranks
    latest_file = root / "latest"
    if not resume:
        if rank == 0 and (tags or latest_file.is_file()):
            aside = root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            root.rename(aside)
            _warn(f"train.resume=false: starting from scratch; the existing checkpoints were moved to {aside}")
        barrier()
        return None
    if rank == 0:
        for leftover in sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []:
            _warn(f"{leftover}: half-written checkpoint (a save was interrupted); ignored")
    latest = _read_tag(latest_file)
    if rank == 0 and latest_file.is_file() and (latest is None or latest not in tags):
        said = latest_file.read_text(errors="replace").strip()[:80]
        _warn(f"{latest_file} names {said!r}, " + ("which is not a checkpoint tag" if latest is None
                                                    else "a directory that does not exist"))
    problems: list[str] = []
    for tag in reversed(tags):
        found = files.verify(root / tag, rank, world)
        severity = agree_max(max((s for s, _ in found), default=0))
        for _, message in found:
            _warn(message)
        problems += [m for _, m in found]
        if severity == REFUSED:
            mine = [m for s, m in found if s == REFUSED]
            raise CheckpointError(mine[0] if mine else f"{root / tag}: another rank refused one of its files "
                                  "(its message names the file)")
        if severity == 0:
            if rank == 0 and (tag != latest or tag != tags[-1]):
                _warn(f"resuming from {root / tag}, the newest intact checkpoint")
            return tag
    if tags or latest_file.is_file():
        raise CheckpointError(f"{root}: checkpoints exist but none is intact ("
                              + ("; ".join(problems[:3]) or "see the warnings of the other ranks")
                              + "); set train.resume=false to start from scratch (they are then moved aside)")
    return None


def load(strategy: Strategy, output_dir: str | Path, tag: str) -> TrainState:
    """Restore model, optimizer, scheduler, train state and this rank's RNG from a verified checkpoint."""
    root = checkpoint_root(output_dir)
    strategy.load_checkpoint(str(root), tag)
    state_file = root / tag / files.TRAIN_STATE
    raw = files.read_json(state_file)
    names = {f.name for f in fields(TrainState)}
    if not isinstance(raw, dict) or not set(raw) <= names or not all(
            isinstance(v, (int, float)) or (v is None and k.startswith("best_")) for k, v in raw.items()):
        raise CheckpointError(f"{state_file}: expected numeric fields among {sorted(names)}")
    rng = root / tag / f"rng_state_{get_rank()}.safetensors"
    if rng.is_file():   # absent when resuming on more ranks than saved
        files.restore_rng(rng)
    return TrainState(**raw)
