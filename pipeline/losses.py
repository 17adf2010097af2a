"""Pure loss functions on tensors, with explicit masks and normalisers.

Every function can return per-row values (`reduction="none"`, shape [B]) besides the batch value,
so tests can check that a row's loss does not depend on the rest of the batch. Conventions:

* labels use -100 for "no target" (prompt, padding, latent slots);
* `IGNORE_INDEX` rows or whole batches without targets give a loss of exactly 0 that still depends
  on the logits, so the backward graph is the same on every rank (ZeRO-3 needs identical work).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
Reduction = Literal["mean", "sum", "none"]


def token_ce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token CE where logits[:, t] predicts targets[:, t] (already aligned).

    logits [B, T, V], targets [B, T] → (loss [B, T] with 0 where ignored, mask [B, T] float).
    """
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    # fp32 log-softmax: bf16 CE over a 50k-128k vocabulary loses most of its precision.
    loss = F.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none")    # [B, T]
    return loss * mask, mask.float()


def reduce_tokens(loss: Tensor, mask: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Reduce a [B, T] token loss: "mean" over all target tokens of the batch, "none" → per-row
    token mean [B] (0 for rows without targets), "sum" → the plain sum."""
    if reduction == "none":
        return loss.sum(-1) / mask.sum(-1).clamp(min=1)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / mask.sum().clamp(min=1)


def causal_lm_ce(logits: Tensor, labels: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Next-token CE with labels aligned to the inputs (HF convention): logits[:, t] predicts
    labels[:, t + 1]. logits [B, T, V], labels [B, T]."""
    loss, mask = token_ce(logits[:, :-1], labels[:, 1:])
    return reduce_tokens(loss, mask, reduction)


def layerwise_distill(student: list[Tensor], teacher: list[Tensor], *, kind: str = "smooth_l1",
                      normalize_by_teacher_std: bool = True, reduction: Reduction = "mean") -> Tensor:
    """CODI's layer-wise distillation at one position per row.

    student, teacher: one [B, d] tensor per layer (embedding output included). The teacher is
    detached here, whatever the caller passed: it is a target, never trained through this loss.
    Per layer: SmoothL1 (or squared L2) averaged over the hidden size, divided by the teacher's std
    over batch × hidden at that layer (CODI's scale normalisation); then the mean over layers.
    Returns the batch mean, or per-row values [B] with `reduction="none"` (the std stays the
    batch's, as the method defines it; pass normalize_by_teacher_std=False for batch-free values).
    """
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} layers, teacher {len(teacher)}")
    if kind not in ("smooth_l1", "l2"):
        raise ValueError(f"method.codi.distill_loss: unknown {kind!r}; choose smooth_l1 or l2")
    per_layer = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.detach().float()                                         # [B, d]
        if kind == "smooth_l1":
            dist = F.smooth_l1_loss(s, t, reduction="none").mean(-1)                 # [B]
        else:
            dist = (s - t).pow(2).mean(-1)                                           # [B]
        if normalize_by_teacher_std:
            dist = dist / t.std().clamp(min=1e-6)
        per_layer.append(dist)
    per_row = torch.stack(per_layer, 0).mean(0)                                      # [B]
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Σ values·weights / max(1, Σ weights): a mean over the entries that count, 0 (still in the
    graph) when none do."""
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)
