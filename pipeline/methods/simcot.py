"""SIM-CoT: step-level supervision of the latents of CODI or Coconut (`method.simcot.base`).

    loss = base loss (codi.run or coconut.run, unchanged) + λ_explain · explain loss
           explain loss = Σ over (row, latent) pairs with a target of the pair's token-mean CE,
                          / the number of such pairs in the global batch

The explain loss (pipeline/methods/step_decoder.py) trains an auxiliary decoder to generate step k
from latent k alone; its gradient flows back through the latent into the projection and the LoRA
weights. Alignment: CODI latent k ↔ step k; Coconut with c latents per step: latents k·c … k·c+c−1
↔ step k, over the steps the latents replace at the current stage. More steps than latents: the
tail is merged into the last latent's target; fewer: the extra latents have no target (the paper),
or repeat the last step (`method.simcot.extra_latents: repeat_last`).

Nothing is inherited: the base method's functions are called, and the decoder is added beside its
parts. At inference the decoder is dropped (`inference_parts`), so it costs nothing.
"""
from __future__ import annotations

from types import ModuleType

from torch import nn

from pipeline.config import Config
from pipeline.methods import MethodOutput, StepContext, coconut, codi, step_decoder

BASES: dict[str, ModuleType] = {"codi": codi, "coconut": coconut}


def base_method(cfg: Config) -> ModuleType:
    return BASES[cfg.method.simcot.base]


def build_parts(cfg: Config, loaded) -> nn.ModuleDict:
    """The base method's parts plus the decoder: "decoder" (full, separate), "decoder_proj"
    (separate), or the "step_decoder" LoRA adapter inside parts["lm"] (shared)."""
    parts = base_method(cfg).build_parts(cfg, loaded)
    step_decoder.build(cfg, loaded, parts)
    return parts


def inference_parts(parts: nn.ModuleDict) -> nn.ModuleDict:
    """What export keeps: the base method's parts, without the decoder (or its adapter)."""
    return step_decoder.drop_decoder(parts)


def make_collate(cfg: Config, loaded, parts: nn.ModuleDict):
    base_collate = base_method(cfg).make_collate(cfg, loaded, parts)
    tok = step_decoder.decoder_tokenizer(cfg, loaded)
    on_coconut = cfg.method.simcot.base == "coconut"
    per_step = step_decoder.latents_per_step(cfg)

    def collate(examples, stage: int = 0) -> dict:
        batch = base_collate(examples, stage)
        if on_coconut:
            counts = batch["latent_active"].sum(1).tolist()         # latents each row uses
            width = batch["latent_active"].shape[1]
        else:
            width = batch["num_latents"]                            # fewer at a gradual CODI stage
            counts = [width] * len(examples)
        repeat = cfg.method.simcot.extra_latents == "repeat_last"
        targets = [step_decoder.align_steps(steps, n, per_step, repeat_last=repeat) + [None] * (width - n)
                   for steps, n in zip(batch["latent_steps"], counts)]
        batch.update(step_decoder.encode_targets(targets, tok, cfg.method.simcot.max_step_tokens))
        return batch

    return collate


def loss_counts(batch: dict, cfg: Config) -> dict[str, int]:
    """The base method's counts plus the (row, latent) pairs with a step target: the explain loss
    is a mean over latents (each latent's CE a mean over its own step tokens)."""
    return {**base_method(cfg).loss_counts(batch, cfg), "step_decoder": int(batch["step_has_target"].sum())}


def run(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext) -> MethodOutput:
    counts = ctx.counts_for(batch, cfg, loss_counts)
    out = base_method(cfg).run(parts, batch, cfg, ctx)
    explain, per_row = step_decoder.explain_loss(parts, cfg, out.latents, batch, count=counts["step_decoder"],
                                                 agree_max=ctx.agree_max)
    weight = cfg.method.simcot.explain_weight
    return MethodOutput(loss=out.loss + weight * explain,
                        logs={**out.logs, "step_decoder": explain.detach()},
                        per_row={**out.per_row, "step_decoder": per_row},
                        latents=out.latents, latent_active=out.latent_active)


def compute_loss(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext):
    out = run(parts, batch, cfg, ctx)
    return out.loss, out.logs
