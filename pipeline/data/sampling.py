"""Deterministic shuffling and sharding for data-parallel training.

Every rank computes the same permutation from ``(seed, epoch)`` alone — no communication —
and takes its own strided slice. Under DeepSpeed ZeRO-3 every rank must run the same number of
steps (a rank that stops early leaves the others waiting in a collective forever), so
:func:`shard` gives every rank the same count.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["epoch_shard", "shard", "shuffled_indices"]


def shuffled_indices(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    Identical on every rank and every run; different for each epoch. The RNG is seeded with the
    string ``"seed:epoch"`` (hashed with SHA-512 by :mod:`random`), so unlike ``seed + epoch``
    the pairs (0, 1) and (1, 0) do not collide.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    indices = list(range(n))
    random.Random(f"{int(seed)}:{int(epoch)}").shuffle(indices)
    return indices


def shard(indices: Sequence[int], rank: int, world_size: int, pad: bool = True) -> list[int]:
    """This rank's share of ``indices``: the strided slice ``indices[rank::world_size]``
    after making the length a multiple of ``world_size``.

    ``pad=True`` (default): the list is extended by wrapping around to its start (the first
    ``k`` indices are repeated), so every example is seen and every rank gets
    ``ceil(len / world_size)`` items; at most ``world_size - 1`` examples are seen twice per
    epoch. ``pad=False``: the tail that does not fill a full round is dropped instead, so every
    rank gets ``len // world_size`` items. Either way all ranks get the same count and never
    diverge in step count.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    items = list(indices)
    remainder = len(items) % world_size
    if remainder:
        if pad:
            need = world_size - remainder
            # Wrap around (repeatedly, in case there are fewer items than ranks).
            items += [items[i % len(items)] for i in range(need)]
        else:
            items = items[: len(items) - remainder]
    return items[rank::world_size]


def epoch_shard(
    n: int, seed: int, epoch: int, rank: int, world_size: int, pad: bool = True
) -> list[int]:
    """``shard(shuffled_indices(n, seed, epoch), rank, world_size, pad)`` — one epoch's order
    for one rank."""
    return shard(shuffled_indices(n, seed, epoch), rank, world_size, pad=pad)
