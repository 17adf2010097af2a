"""Pure loss functions on tensors, with explicit masks and normalisers.

Every function can return per-row values (`reduction="none"`, shape [B]) besides the batch value,
so tests can check that a row's loss does not depend on the rest of the batch. Conventions:

* labels use -100 for "no target" (prompt, padding, latent slots);
* `IGNORE_INDEX` rows or whole batches without targets give a loss of exactly 0 that still depends
  on the logits, so the backward graph is the same on every rank (ZeRO-3 needs identical work);
* training normalises each part by its count over the whole global batch (`share`): a micro
  batch's loss is its sum over targets divided by the targets of every micro batch of the
  optimizer step on every rank, as transformers does with `num_items_in_batch`. A mean per micro
  batch would weigh the tokens of short examples more and break "batch 8 = 4 x accumulation 2".
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


def share(values: Tensor, count: float) -> Tensor:
    """`Σ values / max(1, count)`: this micro batch's share of a loss part whose `count` targets
    (tokens, rows or latents) are counted over the whole global batch. The shares of all micro
    batches and ranks add up to the global mean. A count of 0 gives exactly 0, still in the graph."""
    return values.float().sum() / max(float(count), 1.0)


def causal_lm_ce(logits: Tensor, labels: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Next-token CE with labels aligned to the inputs (HF convention): logits[:, t] predicts
    labels[:, t + 1]. logits [B, T, V], labels [B, T]."""
    loss, mask = token_ce(logits[:, :-1], labels[:, 1:])
    return reduce_tokens(loss, mask, reduction)


def layerwise_distill(student: list[Tensor], teacher: list[Tensor], *, kind: str = "smooth_l1",
                      normalize_by_teacher_std: bool = True, std_over: str = "batch",
                      reduction: Reduction = "mean") -> Tensor:
    """CODI's layer-wise distillation at one position per row.

    student, teacher: one [B, d] tensor per layer (embedding output included). The teacher is
    detached here, whatever the caller passed: it is a target, never trained through this loss.
    Per layer: SmoothL1 (or squared L2) averaged over the hidden size, divided by the teacher's std
    at that layer (CODI's scale normalisation); then the mean over layers. The std is taken over
    `std_over="batch"` × hidden (the paper: it depends on which rows share the micro batch) or
    `"row"`: each row's own teacher vector over hidden (a row's value then never depends on the
    rest of the batch, so accumulation and data parallelism give exactly the same loss).
    Returns the batch mean, or per-row values [B] with `reduction="none"`.
    """
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} layers, teacher {len(teacher)}")
    if kind not in ("smooth_l1", "l2"):
        raise ValueError(f"method.codi.distill_loss: unknown {kind!r}; choose smooth_l1 or l2")
    if std_over not in ("batch", "row"):
        raise ValueError(f"method.codi.teacher_std: unknown {std_over!r}; choose row or batch")
    per_layer = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.detach().float()                                         # [B, d]
        if kind == "smooth_l1":
            dist = F.smooth_l1_loss(s, t, reduction="none").mean(-1)                 # [B]
        else:
            dist = (s - t).pow(2).mean(-1)                                           # [B]
        if normalize_by_teacher_std:
            std = t.std() if std_over == "batch" else t.std(-1)                      # [] or [B]
            dist = dist / std.clamp(min=1e-6)
        per_layer.append(dist)
    per_row = torch.stack(per_layer, 0).mean(0)                                      # [B]
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()
