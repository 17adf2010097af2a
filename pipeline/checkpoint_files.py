"""What a checkpoint directory holds besides DeepSpeed's files, and how it is verified.

    step_40/
      manifest.json               every other file: size and CRC32, written last (by rank 0)
      train_state.json            where the loop stands (TrainState), JSON
      rng_state_<rank>.safetensors  python, numpy, torch (and cuda) generators of each rank
      mp_rank_00_model_states.pt, *optim_states.pt …   DeepSpeed's own (torch.save zip archives)

Nothing here unpickles: JSON and safetensors only; DeepSpeed's .pt files are scanned for pickled
types without running them (strategy.refused_globals) and loaded by strategy.safe_torch_load.

Checksum: CRC32 (zlib), not SHA-256. The manifest detects accidental damage (truncated or torn
writes, a file copied half-way, bit rot); it is no defence against someone who can write the
directory, since they could rewrite manifest.json too, whatever the hash; the pickle allow-list
is that defence. CRC32 misses a random corruption with probability 2^-32 per file, and on these
machines it hashes at 2.4 GB/s against SHA-256's 1.0 GB/s: an 8B full fine-tune's ~110 GB of
checkpoint split over 8 ranks costs ~6 s per save instead of ~14 s, and the same again on resume.

Import-light on purpose (torch, numpy and safetensors load inside the functions), so the training
entry point can catch CheckpointError before torch is imported.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

MANIFEST, TRAIN_STATE = "manifest.json", "train_state.json"
MANIFEST_FORMAT = 1
_PART = ".manifest-part-"        # per-rank shares of the manifest, merged by rank 0
_CHUNK = 16 << 20

DAMAGED, REFUSED = 1, 2          # problem severities: fall back to an older checkpoint / stop


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names the file or directory and what is wrong."""


# --------------------------------------------------------------------------- small durable writes

def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (a crash after it keeps it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


# --------------------------------------------------------------------------- RNG state

def save_rng(path: Path) -> None:
    """This rank's generators as tensors (safetensors) plus the scalars of their state as metadata."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    # json.dumps writes floats with repr, which round-trips them exactly.
    meta = {"python": json.dumps([py_version, py_gauss]),
            "numpy": json.dumps([np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)])}
    save_file(tensors, str(path), metadata=meta)


def restore_rng(path: Path) -> None:
    import random

    import numpy as np
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        py_version, py_gauss = json.loads(meta["python"])
        np_kind, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
        python_state = (py_version, tuple(int(x) for x in tensors["python"].tolist()), py_gauss)
        numpy_state = (np_kind, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(tensors["torch"])
    except Exception as exc:    # safetensors, JSON, key and shape errors alike: name the file
        raise CheckpointError(f"{path}: not a valid RNG state ({type(exc).__name__}: {exc})") from None
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# --------------------------------------------------------------------------- manifest

def list_files(directory: Path) -> list[str]:
    """Every file under `directory` (relative, sorted), the manifest and its parts excluded."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(_PART))


def checksum(path: Path, sync: bool = False) -> str:
    """CRC32 of a file as 8 hex digits; `sync` also flushes it to disk (it was just written)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
        if sync:
            os.fsync(f.fileno())
    return f"{crc:08x}"


def write_file_list(directory: Path) -> None:
    """Rank 0, once every rank finished writing: the one listing all ranks share out (each rank's
    own listing could lag behind on a network filesystem)."""
    write_json(directory / f"{_PART}list.json", list_files(directory))


def write_manifest_part(directory: Path, rank: int, world: int) -> None:
    """This rank's share of rank 0's file list (every world-th name): sizes and checksums, so the
    hashing (and fsync) of a large checkpoint runs on every rank in parallel."""
    share = read_json(directory / f"{_PART}list.json")[rank::world]
    entries = {name: {"size": (directory / name).stat().st_size, "crc32": checksum(directory / name, sync=True)}
               for name in share}
    write_json(directory / f"{_PART}{rank}.json", entries)


def merge_manifest(directory: Path, world: int) -> None:
    """Rank 0, after every part is written: one manifest.json covering exactly the files present."""
    listed = read_json(directory / f"{_PART}list.json")
    files: dict = {}
    for rank in range(world):
        files.update(read_json(directory / f"{_PART}{rank}.json"))
    if sorted(files) != listed or list_files(directory) != listed:
        raise CheckpointError(f"{directory}: its files changed while the manifest was written")
    for part in directory.glob(f"{_PART}*"):
        part.unlink()
    write_json(directory / MANIFEST, {"format": MANIFEST_FORMAT, "checksum": "crc32", "files": files})
    fsync_dir(directory)


def write_manifest(directory: Path) -> None:
    """The manifest of a directory in one process (tools and tests)."""
    write_file_list(Path(directory))
    write_manifest_part(Path(directory), 0, 1)
    merge_manifest(Path(directory), 1)


def verify(directory: Path, rank: int = 0, world: int = 1, checksums: bool = True) -> list[tuple[int, str]]:
    """Problems of a checkpoint directory as (DAMAGED | REFUSED, message naming the file).

    Shared between ranks: rank r checks every world-th file (size, CRC32, pickled types), rank 0
    also the file list, so each problem is reported by exactly one rank. `checksums=False` checks
    only the file list and sizes (cheap; pruning uses it).
    """
    from pipeline.strategy import refused_globals

    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        if rank != 0:
            return []
        return [(DAMAGED, f"{directory}: no {MANIFEST} (its save did not finish, or an older version wrote it)")]
    try:
        manifest = read_json(manifest_file)
        files = {name: (int(e["size"]), str(e["crc32"])) for name, e in manifest["files"].items()}
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return [(DAMAGED, f"{manifest_file}: not a valid manifest ({exc})")] if rank == 0 else []
    present = set(list_files(directory))
    problems = []
    if rank == 0:
        problems += [(DAMAGED, f"{directory / n}: missing (listed in {MANIFEST})")
                     for n in sorted(set(files) - present)]
        problems += [(DAMAGED, f"{directory / n}: not in {MANIFEST} (added after the save)")
                     for n in sorted(present - set(files))]
    for name in sorted(set(files) & present)[rank::world]:
        path, (size, crc) = directory / name, files[name]
        actual = path.stat().st_size
        if actual != size:
            problems.append((DAMAGED, f"{path}: {actual} bytes, {MANIFEST} says {size} (truncated or overwritten)"))
        elif checksums and checksum(path) != crc:
            problems.append((DAMAGED, f"{path}: CRC32 differs from {MANIFEST} (damaged or replaced)"))
        elif checksums and name.endswith(".pt"):
            try:
                refused = refused_globals(path)
            except Exception as exc:
                problems.append((DAMAGED, f"{path}: not a readable torch.save archive ({exc})"))
                continue
            if refused:
                problems.append((REFUSED, f"{path}: refused: it holds pickled objects outside the allow-list of "
                                          f"types DeepSpeed writes ({', '.join(refused)}); nothing in it was run"))
        elif checksums and name.endswith((".safetensors", ".json")):
            # Parsed now, on the rank that checks it, rather than failing one rank alone mid-load.
            try:
                _parse(path)
            except Exception as exc:
                problems.append((DAMAGED, f"{path}: unreadable ({type(exc).__name__}: {exc})"))
    return problems


def _parse(path: Path) -> None:
    if path.suffix == ".json":
        json.loads(path.read_text())
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        f.metadata()
