"""Coconut: a curriculum that replaces reasoning steps by continuous thoughts, stage by stage.

Stage k (k = 0 … K = method.coconut.max_latent_stage), c = method.coconut.c_thought:

    k = 0:  question_prompt(Q) → cot_text(steps, A) + EOS                 (exactly CoT-SFT)
    k ≥ 1:  question_prompt(Q) <|start-latent|> · k·c latents · <|end-latent|> → cot_text(rest, A) + EOS
            rest = steps[k:] for k < K; the last stage K removes every remaining step.

CE covers only the remaining steps, the answer and EOS. The paper's "n+1 passes, each filling one
latent slot and reusing the KV cache of the unchanged prefix" is exactly `rollout_latents`: the
prompt pass, one cached pass per latent (input = last hidden state of the previous position, no
projection), then the suffix pass; gradients flow through all of them. Every rank runs
`ctx.agree_max(n)` latent passes, extra columns masked, so ZeRO-3 sees the same forwards everywhere.

Curriculum helpers for the engine: `stage_for_epoch`, `stage_changed`, `should_reset_optimizer`,
`curriculum_epochs`, `inference_num_latents`. With `method.coconut.init_from` (a CoT-SFT export) the
weights start from that checkpoint and stage 0 is skipped: the checkpoint *is* stage 0, as in the
reference, which resumes its CoT run at stage 1.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config
from pipeline.latent import cot_text, embed, forward_step, rollout_latents
from pipeline.losses import IGNORE_INDEX, reduce_tokens, share, token_ce
from pipeline.methods import MethodOutput, StepContext
from pipeline.methods.batching import encode, encode_prompt, model_device, pad_batch, suffix_logits, to_device
from pipeline.models import unwrap_base

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- curriculum

def stage_for_epoch(epoch: int, cfg: Config) -> int:
    """Curriculum stage of a 0-based epoch: `epochs_per_stage` epochs per stage, then stage K on.

    Starting from a CoT checkpoint (`init_from`), the first epoch is already stage 1.
    """
    cc = cfg.method.coconut
    first = 1 if cc.init_from else 0
    return min(epoch // cc.epochs_per_stage + first, cc.max_latent_stage)


def stage_at(epoch: int, step: int, cfg: Config) -> int:
    """Stage at (epoch, optimizer step): by steps when `method.coconut.steps_per_stage` is set (short
    runs: a stage every N optimizer steps, whatever the data size), else by epochs."""
    cc = cfg.method.coconut
    if cc.steps_per_stage:
        return min(step // cc.steps_per_stage + (1 if cc.init_from else 0), cc.max_latent_stage)
    return stage_for_epoch(epoch, cfg)


def stage_changed(prev_epoch: int, epoch: int, cfg: Config) -> bool:
    return stage_for_epoch(prev_epoch, cfg) != stage_for_epoch(epoch, cfg)


def should_reset_optimizer(prev_epoch: int, epoch: int, cfg: Config) -> bool:
    """True when the engine should forget the optimizer state before `epoch`, by
    method.coconut.reset_optimizer: at each stage change (`stage`, the paper), at every new epoch
    (`epoch`, the reference code) or `never`."""
    mode = cfg.method.coconut.reset_optimizer
    if mode == "epoch":
        return epoch != prev_epoch
    return mode == "stage" and stage_changed(prev_epoch, epoch, cfg)


def curriculum_epochs(cfg: Config) -> int:
    """Epochs that walk through every stage once (more epochs stay at the last stage)."""
    cc = cfg.method.coconut
    return (cc.max_latent_stage + (0 if cc.init_from else 1)) * cc.epochs_per_stage


def inference_num_latents(cfg: Config) -> int:
    """Evaluation uses the last stage: K·c latents."""
    return cfg.method.coconut.max_latent_stage * cfg.method.coconut.c_thought


def stage_layout(steps, stage: int, cfg: Config) -> tuple[int, list[str], list[str]]:
    """(number of latents, steps the latents replace, steps left as text) for one example."""
    cc = cfg.method.coconut
    steps = list(steps)
    if stage <= 0:
        return 0, [], steps
    stage = min(stage, cc.max_latent_stage)
    replaced = len(steps) if stage == cc.max_latent_stage else min(stage, len(steps))
    return stage * cc.c_thought, steps[:replaced], steps[replaced:]


# --------------------------------------------------------------------------- parts and batches

def build_parts(cfg: Config, loaded) -> nn.ModuleDict:
    if cfg.method.coconut.init_from:
        load_init_weights(loaded.model, cfg.method.coconut.init_from)
    return nn.ModuleDict({"lm": loaded.model})


def make_collate(cfg: Config, loaded, parts: nn.ModuleDict):
    tok = loaded.tokenizer
    ids = loaded.token_ids
    eos = tok.eos_token_id

    def collate(examples, stage: int = 0) -> dict:
        prompts, suffixes, labels, counts, latent_steps = [], [], [], [], []
        for ex in examples:
            n, replaced, rest = stage_layout(ex.steps, stage, cfg)
            target = encode(tok, cot_text(rest, ex.answer)) + [eos]
            marker = [ids["end_latent"]] if n else []
            prompts.append(encode_prompt(tok, ex.question) + ([ids["start_latent"]] if n else []))
            suffixes.append(marker + target)
            labels.append([IGNORE_INDEX] * len(marker) + target)   # <|end-latent|> is given, not predicted
            counts.append(n)
            latent_steps.append(replaced)
        batch = pad_batch(prompts, suffixes, labels, tok.pad_token_id)
        width = max(counts)
        batch["latent_active"] = torch.tensor([[1] * n + [0] * (width - n) for n in counts], dtype=torch.long)
        batch["latent_steps"] = latent_steps          # python metadata: what each row's latents replace
        return batch

    return collate


# --------------------------------------------------------------------------- loss

def loss_counts(batch: dict, cfg: Config) -> dict[str, int]:
    """The CE's target tokens: the remaining steps, the answer and EOS (the normaliser of its share
    of the global batch)."""
    return {"ce": int((batch["suffix_labels"] != IGNORE_INDEX).sum())}


def run(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext) -> MethodOutput:
    lm = parts["lm"]
    counts = ctx.counts_for(batch, cfg, loss_counts)
    b = to_device(batch, model_device(lm))
    active = b["latent_active"]                                                 # [B, n_local]
    n_cols = ctx.agree_max(int(active.shape[1]))
    if n_cols > active.shape[1]:      # another rank has more latents: run masked columns too
        active = torch.cat([active, active.new_zeros(active.shape[0], n_cols - active.shape[1])], dim=1)

    # Only the last column's logits are read (they predict the first suffix token): skip the rest.
    prev, state = forward_step(lm, embed(lm, b["prompt_ids"]), b["prompt_mask"], None, logits_to_keep=1)
    latents = None
    if n_cols:
        latents, state, outs = rollout_latents(lm, state, n_cols, active=active, logits_to_keep=1)  # [B, n, d]
        prev = outs[-1]
    out, _ = forward_step(lm, embed(lm, b["suffix_ids"]), b["suffix_mask"], state)
    logits = suffix_logits(prev.logits[:, -1:], out.logits)                     # [B, Ts, V]
    tok_loss, tok_mask = token_ce(logits, b["suffix_labels"])
    ce = share(tok_loss, counts["ce"])
    return MethodOutput(loss=ce, logs={"ce": ce.detach()},
                        per_row={"ce": reduce_tokens(tok_loss, tok_mask, "none").detach()},
                        latents=latents, latent_active=active)


def compute_loss(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext):
    out = run(parts, batch, cfg, ctx)
    return out.loss, out.logs


# --------------------------------------------------------------------------- init from CoT

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_safetensors_only(path: Path) -> None:
    """init_from reads safetensors only (what pipeline.export writes). Where the weights (or the
    LoRA adapter) exist only as a pickle, refuse it by name before anything unpickles it:
    transformers would refuse most payloads too, but without naming the file."""
    from pipeline.checkpoint_files import CheckpointError

    wanted = [("model", ("model.safetensors", "model.safetensors.index.json"))]
    if (path / "adapter_config.json").is_file():
        wanted.append(("adapter_model", ("adapter_model.safetensors",)))
    for stem, safe in wanted:
        if any((path / name).is_file() for name in safe):
            continue
        pickles = sorted(p for p in path.glob(f"*{stem}*") if p.suffix in PICKLE_SUFFIXES
                         and p.name.startswith("adapter_") == (stem == "adapter_model"))
        if pickles:
            raise CheckpointError(f"method.coconut.init_from: {pickles[0]}: refused: a pickle file, which loading "
                                  f"could run code from; init_from reads {safe[0]} (as pipeline.export writes)")
        raise CheckpointError(f"method.coconut.init_from: {path} has no {safe[0]}; give a CoT-SFT export directory")


@torch.no_grad()
def load_init_weights(model, path: str | Path) -> None:
    """Copy a CoT-SFT export's weights into `model`'s base weights (LoRA, if any, starts fresh).

    The export is a transformers directory (LoRA merged), or one with `adapter_config.json` beside
    the base weights (merged here). Its tokenizer must be the one this run uses (same vocabulary,
    latent tokens included); a size mismatch is an error, not a silent partial load.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_safetensors_only(path)
    source = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel
        source = PeftModel.from_pretrained(source, str(path)).merge_and_unload()
    wanted = source.state_dict()
    base = unwrap_base(model)
    # peft renames wrapped weights (…q_proj.base_layer.weight, …embed_tokens.token_adapter.base_layer.weight);
    # the adapters' own tensors (lora_*, trainable_tokens_*) are not in a plain checkpoint.
    targets = {name.replace(".token_adapter", "").replace(".base_layer", ""): p
               for name, p in base.state_dict(keep_vars=True).items()
               if ".lora_" not in name and "trainable_tokens_" not in name}
    missing = [n for n in targets if n not in wanted]
    if missing:
        raise ValueError(f"method.coconut.init_from: {path} lacks weights {missing[:5]} …; is it an export "
                         f"of the same architecture?")
    for name, param in targets.items():
        if param.shape != wanted[name].shape:
            raise ValueError(f"method.coconut.init_from: {name} has shape {tuple(wanted[name].shape)} in {path}, "
                             f"{tuple(param.shape)} here; use the export's tokenizer (model.tokenizer={path})")
        param.copy_(wanted[name].to(param.dtype))
    # peft's trainable token rows *replace* the embedding rows with their own copy, taken at wrap
    # time; refresh it, or the random rows of the new tokens would override the loaded ones.
    for module in base.modules():
        if hasattr(module, "trainable_tokens_delta") and hasattr(module, "token_indices"):
            weight = module.get_base_layer().weight
            for adapter, indices in module.token_indices.items():
                module.trainable_tokens_delta[adapter].copy_(weight[indices])
                module.trainable_tokens_original[adapter].copy_(weight[indices])
    log.info("coconut: initial weights loaded from %s", path)
