"""CoT-SFT and No-CoT-SFT: plain next-token CE on the target given the question.

    cot:   question_prompt(Q) → cot_text(steps, A) + EOS          (CE on steps, answer, EOS)
    nocot: question_prompt(Q) → answer_text(A) + EOS              (CE on answer, EOS)

Both are the explicit side of every comparison, and CoT-SFT is Coconut's stage 0 and its usual
starting checkpoint. Same padding layout as the latent methods: left-padded prompt, right-padded
target, explicit attention mask and position ids, so a row's loss does not depend on the batch.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config
from pipeline.latent import answer_text, cot_text, positions_from_mask
from pipeline.losses import IGNORE_INDEX, reduce_tokens, share, token_ce
from pipeline.methods import MethodOutput, StepContext
from pipeline.methods.batching import encode, encode_prompt, model_device, pad_batch, to_device


def build_parts(cfg: Config, loaded) -> nn.ModuleDict:
    """Only the language model trains (LoRA + latent-token rows when LoRA is on)."""
    return nn.ModuleDict({"lm": loaded.model})


def target_text(example, nocot: bool) -> str:
    return answer_text(example.answer) if nocot else cot_text(example.steps, example.answer)


def make_collate(cfg: Config, loaded, parts: nn.ModuleDict):
    tok = loaded.tokenizer
    nocot = cfg.method.name == "nocot"

    def collate(examples, stage: int = 0) -> dict:
        prompts = [encode_prompt(tok, ex.question) for ex in examples]
        targets = [encode(tok, target_text(ex, nocot)) + [tok.eos_token_id] for ex in examples]
        return pad_batch(prompts, targets, targets, tok.pad_token_id)

    return collate


def loss_counts(batch: dict, cfg: Config) -> dict[str, int]:
    """The CE's target tokens (the normaliser of its share of the global batch)."""
    return {"ce": int((batch["suffix_labels"] != IGNORE_INDEX).sum())}


def run(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext) -> MethodOutput:
    lm = parts["lm"]
    counts = ctx.counts_for(batch, cfg, loss_counts)
    b = to_device(batch, model_device(lm))
    ids = torch.cat([b["prompt_ids"], b["suffix_ids"]], dim=1)                  # [B, Tp + Ts]
    mask = torch.cat([b["prompt_mask"], b["suffix_mask"]], dim=1)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    tp = b["prompt_ids"].shape[1]
    # Column tp-1 (the prompt's last token, real in every row) predicts suffix token 0.
    tok_loss, tok_mask = token_ce(out.logits[:, tp - 1: -1], b["suffix_labels"])   # [B, Ts]
    ce = share(tok_loss, counts["ce"])
    return MethodOutput(loss=ce, logs={"ce": ce.detach()},
                        per_row={"ce": reduce_tokens(tok_loss, tok_mask, "none").detach()})


def compute_loss(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext):
    out = run(parts, batch, cfg, ctx)
    return out.loss, out.logs
