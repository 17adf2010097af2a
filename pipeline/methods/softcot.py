"""SoftCoT / SoftCoT++: a frozen assistant writes soft thoughts, a trained projection maps them into a frozen LLM.

    assistant: softcot_assistant_text(Q) = instruction + Q + "\\n" + <|latent|> × N         one forward
               (SoftCoT++: S copies, the N placeholder embeddings of copy s = initial token e_s)
               thoughts = projection(last-layer hidden states at the N placeholders)       [B·S, N, d_base]
    base:      user message  instruction + Q + thoughts_prefix + <bot> <|latent|> × N <eot>, in the chat
               template; the N placeholder embeddings are overwritten by the thoughts      one forward, B·S rows
    target:    the assistant turn: socratic_text (published: "## Step i: …" per GSM8K solution line,
               then "Therefore, the final answer is: $\\boxed{a}$.") or cot_text(steps, A); CE on it only
    loss:      S · CE (the LM loss summed over the S copies) + w · InfoNCE across the S thought sets

Parts: "assistant" (frozen causal LM, `method.softcot.assistant_model`, with its own tokenizer),
"lm" (the frozen base = model.*; LoRA when model.lora.enabled), "projection" = Linear(d_assist →
d_base) and, for SoftCoT++, "initial_tokens" = nn.Embedding(S, d_assist) (softcot_sets.py). Every
part sits in the one MethodModule, so ZeRO-3 partitions the frozen models too and the trained
pieces keep fp32 master weights in the engine's optimizer. The text conventions are the ones
evaluation/softcot.py uses at inference (`pipeline.latent.softcot_*`).

The assistant runs in eval mode (no dropout: inference sees the same thoughts): without gradients
for plain SoftCoT, with them (weights still frozen) when initial tokens train through it. Prompts
are left-padded (the assistant's placeholders are its last N columns in every row), targets
right-padded, with explicit masks and position ids, so a row's loss does not depend on the batch.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config, ModelConfig
from pipeline.latent import (
    SOCRATIC_INSTRUCTION,
    SOCRATIC_THOUGHTS_PREFIX,
    SOFTCOT_BEGIN,
    SOFTCOT_END,
    SOFTCOT_PLACEHOLDER,
    cot_text,
    embed,
    left_pad,
    positions_from_mask,
    socratic_text,
    softcot_assistant_text,
    softcot_assistant_turn,
    softcot_base_prompt,
    softcot_user_message,
)
from pipeline.losses import reduce_tokens, token_ce
from pipeline.methods import MethodOutput, StepContext
from pipeline.methods.batching import encode, model_device, optional_part, pad_batch, to_device
from pipeline.methods.softcot_sets import contrastive_loss, fill_slots, initial_token_rows, make_initial_tokens
from pipeline.models import load_model, load_tokenizer

TINY = ("tiny-llama", "tiny-gpt2")
ASSISTANT_DIR = "assistant"


# --------------------------------------------------------------------------- texts and the assistant

def base_texts(cfg: Config) -> tuple[str, str]:
    """(instruction, thoughts_prefix) of the base user message; None fields take the target's default."""
    sc = cfg.method.softcot
    socratic = sc.target == "socratic"
    instruction = sc.instruction if sc.instruction is not None else (SOCRATIC_INSTRUCTION if socratic else "")
    prefix = sc.thoughts_prefix if sc.thoughts_prefix is not None else (SOCRATIC_THOUGHTS_PREFIX if socratic else "")
    return instruction, prefix


def target_text(cfg: Config, ex) -> str:
    """What the base model learns to write for `ex` (before the template closes the turn)."""
    sc = cfg.method.softcot
    if sc.target == "annotations":
        return cot_text(ex.steps, ex.answer)
    from pipeline.data.views import missing_natural_language

    if missing_natural_language(ex):
        raise ValueError(f"{ex.source_id}: method.softcot.target=socratic needs natural-language solution lines")
    return socratic_text(ex.nl_steps or ex.steps, ex.answer, sc.answer_line)


def base_sequence(cfg: Config, tok, ex) -> tuple[list[int], list[int]]:
    """(prompt ids, trained ids) of the base model for one example, tokenized as the chat template
    writes the whole conversation (the split between them is checked, not assumed)."""
    sc = cfg.method.softcot
    instruction, prefix = base_texts(cfg)
    n = sc.num_thoughts
    user = softcot_user_message(ex.question, n, SOFTCOT_PLACEHOLDER, SOFTCOT_BEGIN, SOFTCOT_END, instruction, prefix)
    prompt_text = softcot_base_prompt(tok, ex.question, n, SOFTCOT_PLACEHOLDER, SOFTCOT_BEGIN, SOFTCOT_END,
                                      instruction, sc.chat_template, prefix)
    prompt = list(tok(prompt_text).input_ids)
    placeholder = tok.convert_tokens_to_ids(SOFTCOT_PLACEHOLDER)
    if prompt.count(placeholder) != n:
        raise ValueError(f"the base prompt must hold {SOFTCOT_PLACEHOLDER} exactly {n} times: {ex.question!r}")
    turn = softcot_assistant_turn(tok, prompt_text, user, target_text(cfg, ex), sc.chat_template)
    trained = encode(tok, turn)
    if not (sc.chat_template and getattr(tok, "chat_template", None) is not None):
        trained.append(tok.eos_token_id)              # no template closes the turn: EOS ends it
    elif prompt + trained != list(tok(prompt_text + turn).input_ids):
        raise ValueError(f"the base tokenizer merges tokens across the prompt/answer boundary of the chat "
                         f"template; set method.softcot.chat_template=false ({ex.source_id})")
    return prompt, trained


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
    """{"assistant" (frozen), "lm" (frozen; LoRA adapters train when enabled), "projection"
    [, "initial_tokens" (SoftCoT++)]}."""
    sc = cfg.method.softcot
    a_tok = assistant_tokenizer(cfg, loaded.tokenizer)
    assistant = load_assistant(cfg, a_tok)
    lm = loaded.model
    if not cfg.model.lora.enabled:
        lm.requires_grad_(False)
    d_assist = assistant.config.get_text_config().hidden_size
    parts = {"assistant": assistant, "lm": lm, "projection": nn.Linear(d_assist, loaded.hidden_size)}
    if sc.num_thought_sets > 1:
        rows, _ = initial_token_rows(a_tok, sc.num_thought_sets, sc.initial_tokens)
        parts["initial_tokens"] = make_initial_tokens(assistant, rows)
    return nn.ModuleDict(parts)


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
            prompt, target = base_sequence(cfg, tok, ex)
            a_ids.append(ids)
            prompts.append(prompt)
            targets.append(target)
        batch = pad_batch(prompts, targets, targets, tok.pad_token_id)
        batch["thought_slots"] = (batch["prompt_ids"] == b_ph) & batch["prompt_mask"].bool()     # [B, Tp]
        batch["assistant_ids"], batch["assistant_mask"] = left_pad(a_ids, a_tok.pad_token_id)  # [B, Ta]
        return batch

    return collate


# --------------------------------------------------------------------------- the loss step

def soft_thoughts(parts: nn.ModuleDict, ids: torch.Tensor, mask: torch.Tensor, n: int, sets: int = 1) -> torch.Tensor:
    """One assistant forward → projected thoughts [B·S, n, d_base] (row b·S + s).

    With initial tokens (SoftCoT++) the S copies run as one batch and the graph is kept, so the
    initial tokens train through the frozen assistant; plain SoftCoT runs it without gradients.
    """
    assistant, projection = parts["assistant"], parts["projection"]
    initial = optional_part(parts, "initial_tokens")
    was_training = assistant.training
    assistant.eval()
    try:
        with torch.no_grad() if initial is None else contextlib.nullcontext():
            embeds = embed(assistant, ids)                                       # [B, Ta, d_assist]
            if initial is not None:
                # A module call (not .weight), so ZeRO-3 gathers the partitioned rows.
                table = initial(torch.arange(sets, device=ids.device))           # [S, d_assist]
                embeds = fill_slots(embeds, table, n, sets)                      # [B·S, Ta, d_assist]
                mask = mask.repeat_interleave(sets, dim=0)
            out = assistant(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                            use_cache=False, output_hidden_states=True)
    finally:
        assistant.train(was_training)
    hidden = out.hidden_states[-1][:, ids.shape[1] - n:]                 # [B·S, n, d_assist], left-padded
    return projection(hidden.to(projection.weight.dtype))                # [B·S, n, d_base]


def run(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext) -> MethodOutput:
    sc = cfg.method.softcot
    lm, n = parts["lm"], sc.num_thoughts
    sets = sc.num_thought_sets if "initial_tokens" in parts else 1
    b = to_device(batch, model_device(lm))
    thoughts = soft_thoughts(parts, b["assistant_ids"], b["assistant_mask"], n, sets)     # [B·S, n, d]

    # The S copies of the base prompt: one forward over B·S rows, not a loop over sets.
    rep = lambda t: t.repeat_interleave(sets, dim=0)                     # noqa: E731
    emb = rep(embed(lm, b["prompt_ids"]))                                # [B·S, Tp, d]
    slots = rep(b["thought_slots"])[..., None]                           # [B·S, Tp, 1]
    emb = emb.masked_scatter(slots, thoughts.to(emb.dtype).reshape(-1, emb.shape[-1]))
    emb = torch.cat([emb, embed(lm, rep(b["suffix_ids"]))], dim=1)       # [B·S, Tp + Ts, d]
    mask = torch.cat([rep(b["prompt_mask"]), rep(b["suffix_mask"])], dim=1)
    out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    tp = b["prompt_ids"].shape[1]
    # Column tp-1 (the prompt's last token, real in every row) predicts suffix token 0.
    tok_loss, tok_mask = token_ce(out.logits[:, tp - 1: -1], rep(b["suffix_labels"]))   # [B·S, Ts]
    ce = reduce_tokens(tok_loss, tok_mask)                               # token mean over every copy
    per_row = reduce_tokens(tok_loss, tok_mask, "none").reshape(-1, sets).mean(1)        # [B]
    logs = {"ce": ce.detach()}
    loss = ce
    if sets > 1:
        contrast = contrastive_loss(thoughts, sets, sc.contrastive_temperature, sc.contrastive_dropout,
                                    parts.training)
        weight = sc.contrastive_weight if sc.contrastive_weight is not None else 1.0 / sets
        loss = sets * ce + weight * contrast                              # the LM loss summed over the S copies
        logs["contrastive"] = contrast.detach()
    active = torch.ones(thoughts.shape[:2], dtype=torch.long, device=thoughts.device)
    return MethodOutput(loss=loss, logs=logs, per_row={"ce": per_row.detach()}, latents=thoughts,
                        latent_active=active)


def compute_loss(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext):
    out = run(parts, batch, cfg, ctx)
    return out.loss, out.logs


# --------------------------------------------------------------------------- export

def export_meta(cfg: Config, parts: nn.ModuleDict) -> dict:
    """latent_meta.json fields of a SoftCoT export (evaluation/softcot.py `from_exported` reads them);
    SoftCoT++'s trained initial tokens travel in latent_extra.safetensors as "initial_tokens.weight"."""
    sc, proj = cfg.method.softcot, parts["projection"]
    instruction, prefix = base_texts(cfg)
    return {"num_latents": sc.eval_num_thoughts, "num_thoughts": sc.eval_num_thoughts,
            "train_num_thoughts": sc.num_thoughts, "start_token": SOFTCOT_BEGIN, "end_token": SOFTCOT_END,
            "placeholder": SOFTCOT_PLACEHOLDER,
            "projection": {"kind": "linear", "in_features": proj.in_features, "out_features": proj.out_features,
                           "bias": proj.bias is not None},
            "assistant_model": sc.assistant_model, "assistant_dir": ASSISTANT_DIR,
            "assistant_instruction": sc.assistant_instruction, "instruction": instruction,
            "thoughts_prefix": prefix, "chat_template": sc.chat_template, "target": sc.target,
            "num_thought_sets": sc.num_thought_sets if "initial_tokens" in parts else 1,
            "initial_tokens": "trained" if "initial_tokens" in parts else None}


def save_assistant(parts: nn.ModuleDict, cfg: Config, tokenizer, out: Path) -> None:
    """The frozen assistant as a plain HF directory with its own tokenizer (the export is self-contained)."""
    from pipeline.models import torch_dtype

    assistant = parts["assistant"].to(torch_dtype(cfg.model.dtype))
    assistant.save_pretrained(str(out))
    assistant_tokenizer(cfg, tokenizer).save_pretrained(str(out))
