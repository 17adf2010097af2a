"""Method registry and the one nn.Module that holds every part a method trains.

Each method is one module (`cot`, `coconut`, `codi`, `simcot`, `softcot`) exposing three plain functions,
with no inheritance between methods:

    build_parts(cfg: Config, loaded: LoadedModel) -> nn.ModuleDict
        {"lm": causal LM (maybe peft), optional "projection", "decoder", "decoder_proj", "assistant", ...}
    make_collate(cfg: Config, loaded: LoadedModel, parts: nn.ModuleDict) -> Callable[[list[Example], int], dict]
        examples + curriculum stage -> a batch dict of tensors (and plain python metadata)
    compute_loss(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext)
        -> tuple[Tensor, dict[str, Tensor]]   total loss and its named parts (detached for logging)
    loss_counts(batch: dict, cfg: Config) -> dict[str, int]          (optional)
        how many targets each loss part of `batch` has (tokens, rows, latents): the engine sums
        them over an optimizer step's micro batches and all ranks and passes the totals back in
        `StepContext.counts`; the loss is then this micro batch's share of the global mean.
        A method without it returns a mean over its micro batch.

The engine wraps `parts` in `MethodModule` so a single `deepspeed.initialize` covers the main model,
the projection and the step decoder together, and calls `engine(batch, ctx)`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

from torch import Tensor, nn

from pipeline.config import Config

METHOD_MODULES = {"cot": "pipeline.methods.cot", "nocot": "pipeline.methods.cot",
                  "coconut": "pipeline.methods.coconut", "codi": "pipeline.methods.codi",
                  "simcot": "pipeline.methods.simcot", "softcot": "pipeline.methods.softcot"}


def _single_process_max(value: int) -> int:
    return value


@dataclass
class StepContext:
    """What a loss step needs from outside the batch.

    agree_max: all-reduce max of a data-dependent count across ranks (identity in one process);
    every loop whose length depends on data must run `agree_max(n)` times on every rank.
    """
    agree_max: Callable[[int], int] = field(default=_single_process_max)
    stage: int = 0          # Coconut curriculum stage
    step: int = 0           # optimizer step, for logging
    # Targets of each loss part over the whole global batch (all micro batches of the optimizer
    # step, all ranks); None = this batch is the whole global batch (tests, benchmarks).
    counts: dict[str, float] | None = None

    def counts_for(self, batch: dict, cfg: Config, loss_counts: Callable[[dict, Config], dict]) -> dict:
        """The normalisers of the loss parts: the global counts, or this batch's own."""
        return self.counts if self.counts is not None else loss_counts(batch, cfg)


@dataclass
class MethodOutput:
    """Everything one loss step computed; `compute_loss` returns `(loss, logs)` from it.

    `per_row` holds each example's own value of every loss part (token mean within the row), which
    must not depend on what else is in the batch; `latents` lets SIM-CoT and interpretability reuse
    the rollout instead of running it twice.
    """
    loss: Tensor                                   # scalar that backward() gets
    # named parts, detached: this micro batch's shares (summed over micro batches and ranks they
    # give each part's per-target mean over the global batch; a plain mean without ctx.counts)
    logs: dict[str, Tensor]
    per_row: dict[str, Tensor] = field(default_factory=dict)   # name -> [B]
    latents: Tensor | None = None                  # [B, n, d] latent inputs fed back (after projection)
    latent_active: Tensor | None = None            # [B, n] 1 where the row really uses latent column k


def method_module(name: str) -> ModuleType:
    if name not in METHOD_MODULES:
        raise ValueError(f"method.name: unknown method {name!r}; choose one of: {', '.join(METHOD_MODULES)}")
    return importlib.import_module(METHOD_MODULES[name])


class MethodModule(nn.Module):
    """All parts of a method under one module; forward = the method's loss step."""

    def __init__(self, parts: nn.ModuleDict, loss_fn: Callable, cfg: Config):
        super().__init__()
        self.parts = parts
        self._loss_fn = loss_fn
        self._cfg = cfg

    def forward(self, batch: dict, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        return self._loss_fn(self.parts, batch, self._cfg, ctx)


def build_method(cfg: Config, loaded) -> tuple[MethodModule, Callable]:
    """(MethodModule, collate) for the configured method."""
    module = method_module(cfg.method.name)
    parts = module.build_parts(cfg, loaded)
    collate = module.make_collate(cfg, loaded, parts)
    return MethodModule(parts, module.compute_loss, cfg), collate
