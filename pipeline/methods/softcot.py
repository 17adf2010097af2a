"""SoftCoT: a frozen assistant writes soft thoughts, a trained projection maps them into a frozen LLM.

    assistant: softcot_assistant_text(Q) = instruction + Q + "\\n" + <|latent|> × N        one forward
               thoughts = projection(last-layer hidden states at the N placeholders)      [B, N, d_base]
    base:      softcot_base_prompt(Q) = user message  instruction + Q + <bot> <|latent|> × N <eot>
               (in the chat template when the tokenizer has one); the N placeholder embeddings are
               overwritten by the thoughts; target cot_text(steps, A) + EOS                CE on it

Parts: "assistant" (frozen causal LM, `method.softcot.assistant_model`, with its own tokenizer),
"lm" (the frozen base = model.*; LoRA when model.lora.enabled) and "projection" =
Linear(d_assist → d_base), the only trained weights otherwise (fp32 master weights come from the
engine; it trains at train.projection_learning_rate). Every part sits in the one MethodModule, so
ZeRO-3 partitions the frozen models too. The text conventions (placeholder, delimiters, prompt
layout) are the ones evaluation/softcot.py uses at inference (`pipeline.latent.softcot_*`).

The assistant runs without gradients and in eval mode (no dropout: inference sees the same
thoughts); gradients reach the projection through the frozen base model. Prompts are left-padded
(the assistant's placeholders are its last N columns in every row), targets right-padded, with
explicit masks and position ids, so a row's loss does not depend on the batch.

SoftCoT++ (several thought sets from different initial tokens + a contrastive loss) is evaluation
only here (evaluation/softcot.py `initial_tokens`); training covers plain SoftCoT.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.config import Config, ModelConfig
from pipeline.latent import (
    SOFTCOT_BEGIN,
    SOFTCOT_END,
    SOFTCOT_PLACEHOLDER,
    cot_text,
    embed,
    left_pad,
    positions_from_mask,
    softcot_assistant_text,
    softcot_base_prompt,
)
from pipeline.losses import reduce_tokens, token_ce
from pipeline.methods import MethodOutput, StepContext
from pipeline.methods.batching import encode, model_device, pad_batch, to_device
from pipeline.models import load_model, load_tokenizer

TINY = ("tiny-llama", "tiny-gpt2")
ASSISTANT_DIR = "assistant"


# --------------------------------------------------------------------------- the assistant

def assistant_tokenizer(cfg: Config, base_tokenizer):
    """The assistant's own tokenizer (with the latent tokens); a tiny assistant shares the base one."""
    sc = cfg.method.softcot
    if sc.assistant_model in TINY:
        return base_tokenizer
    return load_tokenizer(ModelConfig(name_or_path=sc.assistant_model, gguf_file=sc.assistant_gguf_file,
                                      trust_remote_code=cfg.model.trust_remote_code))


def load_assistant(cfg: Config, tokenizer) -> nn.Module:
    """The frozen assistant LM (no LoRA), in model.dtype, every weight requires_grad=False."""
    sc = cfg.method.softcot
    mcfg = ModelConfig(name_or_path=sc.assistant_model, gguf_file=sc.assistant_gguf_file, dtype=cfg.model.dtype,
                       attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code, tiny=cfg.model.tiny)
    model = load_model(mcfg, tokenizer, lora=False).model
    return model.requires_grad_(False).eval()


def build_parts(cfg: Config, loaded) -> nn.ModuleDict:
    """{"assistant" (frozen), "lm" (frozen; LoRA adapters train when enabled), "projection"}."""
    assistant = load_assistant(cfg, assistant_tokenizer(cfg, loaded.tokenizer))
    lm = loaded.model
    if not cfg.model.lora.enabled:
        lm.requires_grad_(False)
    d_assist = assistant.config.get_text_config().hidden_size
    return nn.ModuleDict({"assistant": assistant, "lm": lm,
                          "projection": nn.Linear(d_assist, loaded.hidden_size)})


# --------------------------------------------------------------------------- batches

def make_collate(cfg: Config, loaded, parts: nn.ModuleDict):
    sc = cfg.method.softcot
    tok, a_tok, n = loaded.tokenizer, assistant_tokenizer(cfg, loaded.tokenizer), sc.num_thoughts
    a_ph, b_ph = a_tok.convert_tokens_to_ids(SOFTCOT_PLACEHOLDER), tok.convert_tokens_to_ids(SOFTCOT_PLACEHOLDER)

    def collate(examples, stage: int = 0) -> dict:
        a_ids, prompts, targets = [], [], []
        for ex in examples:
            ids = list(a_tok(softcot_assistant_text(ex.question, n, SOFTCOT_PLACEHOLDER,
                                                    sc.assistant_instruction)).input_ids)
            if ids[len(ids) - n:] != [a_ph] * n:
                raise ValueError(f"the assistant's input must end with {n} x {SOFTCOT_PLACEHOLDER}: {ex.question!r}")
            prompt = list(tok(softcot_base_prompt(tok, ex.question, n, SOFTCOT_PLACEHOLDER, SOFTCOT_BEGIN,
                                                  SOFTCOT_END, sc.instruction, sc.chat_template)).input_ids)
            if prompt.count(b_ph) != n:
                raise ValueError(f"the base prompt must hold {SOFTCOT_PLACEHOLDER} exactly {n} times: {ex.question!r}")
            a_ids.append(ids)
            prompts.append(prompt)
            targets.append(encode(tok, cot_text(ex.steps, ex.answer)) + [tok.eos_token_id])
        batch = pad_batch(prompts, targets, targets, tok.pad_token_id)
        batch["thought_slots"] = (batch["prompt_ids"] == b_ph) & batch["prompt_mask"].bool()     # [B, Tp]
        batch["assistant_ids"], batch["assistant_mask"] = left_pad(a_ids, a_tok.pad_token_id)  # [B, Ta]
        return batch

    return collate


# --------------------------------------------------------------------------- the loss step

def soft_thoughts(assistant: nn.Module, projection: nn.Linear, ids: Tensor, mask: Tensor, n: int) -> Tensor:
    """One assistant forward (no grad, eval mode) → projected thoughts [B, n, d_base] (with grad)."""
    was_training = assistant.training
    assistant.eval()
    try:
        with torch.no_grad():
            out = assistant(inputs_embeds=embed(assistant, ids), attention_mask=mask,
                            position_ids=positions_from_mask(mask), use_cache=False, output_hidden_states=True)
    finally:
        assistant.train(was_training)
    hidden = out.hidden_states[-1][:, ids.shape[1] - n:]                 # [B, n, d_assist], left-padded
    return projection(hidden.to(projection.weight.dtype))                # [B, n, d_base]


def run(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext) -> MethodOutput:
    lm, n = parts["lm"], cfg.method.softcot.num_thoughts
    b = to_device(batch, model_device(lm))
    thoughts = soft_thoughts(parts["assistant"], parts["projection"], b["assistant_ids"], b["assistant_mask"], n)

    emb = embed(lm, b["prompt_ids"])                                     # [B, Tp, d]
    slots = b["thought_slots"][..., None]                                # [B, Tp, 1]
    emb = emb.masked_scatter(slots, thoughts.to(emb.dtype).reshape(-1, emb.shape[-1]))
    emb = torch.cat([emb, embed(lm, b["suffix_ids"])], dim=1)            # [B, Tp + Ts, d]
    mask = torch.cat([b["prompt_mask"], b["suffix_mask"]], dim=1)
    out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    tp = b["prompt_ids"].shape[1]
    # Column tp-1 (the prompt's last token, real in every row) predicts suffix token 0.
    tok_loss, tok_mask = token_ce(out.logits[:, tp - 1: -1], b["suffix_labels"])   # [B, Ts]
    ce = reduce_tokens(tok_loss, tok_mask)
    active = torch.ones(thoughts.shape[:2], dtype=torch.long, device=thoughts.device)
    return MethodOutput(loss=ce, logs={"ce": ce.detach()},
                        per_row={"ce": reduce_tokens(tok_loss, tok_mask, "none").detach()},
                        latents=thoughts, latent_active=active)


def compute_loss(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext):
    out = run(parts, batch, cfg, ctx)
    return out.loss, out.logs


# --------------------------------------------------------------------------- export

def export_meta(cfg: Config, parts: nn.ModuleDict) -> dict:
    """latent_meta.json fields of a SoftCoT export (evaluation/softcot.py `from_exported` reads them)."""
    sc, proj = cfg.method.softcot, parts["projection"]
    return {"num_latents": sc.eval_num_thoughts, "num_thoughts": sc.eval_num_thoughts,
            "train_num_thoughts": sc.num_thoughts, "start_token": SOFTCOT_BEGIN, "end_token": SOFTCOT_END,
            "placeholder": SOFTCOT_PLACEHOLDER,
            "projection": {"kind": "linear", "in_features": proj.in_features, "out_features": proj.out_features,
                           "bias": proj.bias is not None},
            "assistant_model": sc.assistant_model, "assistant_dir": ASSISTANT_DIR,
            "assistant_instruction": sc.assistant_instruction, "instruction": sc.instruction,
            "chat_template": sc.chat_template}


def save_assistant(parts: nn.ModuleDict, cfg: Config, tokenizer, out: Path) -> None:
    """The frozen assistant as a plain HF directory with its own tokenizer (the export is self-contained)."""
    from pipeline.models import torch_dtype

    assistant = parts["assistant"].to(torch_dtype(cfg.model.dtype))
    assistant.save_pretrained(str(out))
    assistant_tokenizer(cfg, tokenizer).save_pretrained(str(out))
