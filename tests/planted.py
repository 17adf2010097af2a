"""Damage and planted payloads for the checkpoint tests.

`plant` writes a torch.save file whose unpickling (with weights_only=False) creates `marker`,
i.e. runs code; a safe loader never creates it. Where the checkpoint has a manifest it is
rewritten too: an attacker who can write the file can write manifest.json as well, so the
loader itself, not the checksum, has to refuse the file.
"""
from __future__ import annotations

import pathlib
from pathlib import Path

import torch


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):        # unpickling calls Path(marker).touch()
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant(path: Path, marker: Path) -> None:
    torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, path)
    if (path.parent / "manifest.json").is_file():
        from pipeline.checkpoint_files import write_manifest
        write_manifest(path.parent)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    """Same size, different content: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
