"""CODI: one network is teacher (explicit CoT) and student (continuous thoughts) in the same step.

    teacher: question_prompt(Q) → cot_text(steps[:-1], A) + EOS                    CE on all of it
    student: question_prompt(Q) <bot> · n latents · <eot> → answer_text(A) + EOS   CE on the answer
             latent = projection(last hidden state), fed back over the KV cache
    distill: at the position whose output predicts the first answer token (found from the
             tokenization, see batching.first_answer_token; method.codi.distill_position=
             after_reasoning: at <eot> / the last CoT token instead), every layer's hidden state of the
             student vs the *detached* teacher, SmoothL1 or L2, / teacher std, mean over layers
             (std over the row's hidden vector by default: method.codi.teacher_std)
    total:   α·CE_student + β·distill + γ·CE_teacher
    gradual: (method.codi.gradual_steps_per_stage, off by default) at stage k < n the student has k
             latents for the teacher's first k steps and writes the rest after <eot> (CE on them).

The teacher runs once, with gradients (its CE trains it); the distillation target is that same
forward's hidden states, detached — not a second no_grad run with other dropout masks. The question
is encoded once for both (method.codi.shared_question_pass): teacher and student branch from its
KV cache (see `_question_once`; the two-pass structure stays as the reference, `_teacher_alone`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.data.sources import check_written_step
from pipeline.latent import branch, embed, forward_step, positions_from_mask, rollout_latents
from pipeline.losses import IGNORE_INDEX, layerwise_distill, reduce_tokens, share, token_ce
from pipeline.methods import MethodOutput, StepContext
from pipeline.methods.batching import (
    answer_segment,
    encode,
    encode_prompt,
    model_device,
    optional_part,
    pad_batch,
    suffix_logits,
    to_device,
)


class LatentProjection(nn.Sequential):
    """Linear(d, d') → GELU → Linear(d', d) → LayerNorm(d).

    An nn.Sequential so its weights are saved as `projection.0.weight` … (docs/DESIGN.md). Inputs
    are cast to the projection's dtype: it may keep fp32 weights next to a bf16 model.
    """

    def __init__(self, hidden_size: int, inner_size: int | None = None):
        inner = inner_size or hidden_size
        super().__init__(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, hidden_size),
                         nn.LayerNorm(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self[0].weight.dtype))


def build_parts(cfg: Config, loaded) -> nn.ModuleDict:
    """{"lm"} plus {"projection"} when method.codi.projection (the default)."""
    parts = nn.ModuleDict({"lm": loaded.model})
    if cfg.method.codi.projection:
        projection = LatentProjection(loaded.hidden_size, cfg.method.codi.projection_inner_size)
        if cfg.method.codi.latent_scale == "embedding":
            match_embedding_scale(projection, loaded.model)
        parts["projection"] = projection
    return parts


@torch.no_grad()
def match_embedding_scale(projection: LatentProjection, model) -> float:
    """Start the projection's LayerNorm gain at the input embeddings' RMS, so a latent enters the
    model at the scale of a token embedding instead of LayerNorm's unit scale (norm √d).

    Why: a latent is fed back where a token embedding goes. With gain 1 its norm is √d (11 for
    d = 128) against ~0.25 for a token row of a freshly initialised LLaMA: the latent then dominates
    the residual stream of its position, and the layers' updates barely change what is passed on.
    The gain stays trainable; `method.codi.latent_scale: unit` keeps the reference's gain of 1.
    """
    weight = model.get_input_embeddings().weight
    rms = float(weight.float().pow(2).mean().sqrt())
    projection[3].weight.fill_(rms)
    return rms


def stage_at(step: int, cfg: Config) -> int:
    """The gradual schedule's stage at an optimizer step: 1, 2, … every `gradual_steps_per_stage`
    steps, then `num_latents` (plain CODI) for good; 0 (plain CODI) when the schedule is off."""
    every = cfg.method.codi.gradual_steps_per_stage
    return min(1 + step // every, cfg.method.num_latents) if every else 0


def make_collate(cfg: Config, loaded, parts: nn.ModuleDict):
    tok = loaded.tokenizer
    bot, eot, eos = loaded.token_ids["bot"], loaded.token_ids["eot"], tok.eos_token_id
    include_last = cfg.method.codi.include_last_step
    after_reasoning = cfg.method.codi.distill_position == "after_reasoning"

    def collate(examples, stage: int = 0) -> dict:
        # 0 < stage < n: the gradual schedule's stage k = `stage` latents, the student writes the rest.
        k = stage if 0 < stage < cfg.method.num_latents else None
        t_prompts, t_suffixes, s_prompts, s_suffixes, s_labels = [], [], [], [], []
        t_pos, s_pos = [], []
        for ex in examples:
            question = encode_prompt(tok, ex.question)
            steps = list(ex.steps) if include_last else list(ex.steps)[:-1]
            step_ids = encode(tok, "".join(s + "\n" for s in steps))
            rest_ids = encode(tok, "".join(s + "\n" for s in steps[k:])) if k else []   # the student's text
            answer, first = answer_segment(tok, ex.answer)     # first: index of the answer's first token
            t_prompts.append(question)
            t_suffixes.append(step_ids + answer + [eos])
            s_prompts.append(question + [bot])
            s_suffixes.append([eot] + rest_ids + answer + [eos])
            s_labels.append([IGNORE_INDEX] + rest_ids + answer + [eos])     # <eot> is given, not predicted
            if after_reasoning:                                  # columns that predict the answer text
                check_written_step(ex, include_last)
                t_pos.append(len(step_ids) - 1)                  # the last CoT token
                s_pos.append(len(rest_ids))                      # <eot>, or the last token it writes
            else:                                                # the column that predicts its number
                t_pos.append(len(step_ids) + first - 1)
                s_pos.append(len(rest_ids) + first)              # = 1 + rest + first - 1, after <eot>
        batch = pad_batch(t_prompts, t_suffixes, t_suffixes, tok.pad_token_id, prefix="teacher_")
        batch.update(pad_batch(s_prompts, s_suffixes, s_labels, tok.pad_token_id, prefix="student_"))
        batch["teacher_pos"] = torch.tensor(t_pos, dtype=torch.long)              # [B], suffix coords
        batch["student_pos"] = torch.tensor(s_pos, dtype=torch.long)              # [B], suffix coords
        batch["num_latents"] = k or cfg.method.num_latents                       # the same on every rank
        batch["latent_steps"] = [list(ex.steps)[:k] if k else list(ex.steps) for ex in examples]  # SIM-CoT
        return batch

    return collate


def _gather(hidden_states: tuple[Tensor, ...], pos: Tensor) -> list[Tensor]:
    """Each layer's [B, T, d] at one column per row → list of [B, d]."""
    rows = torch.arange(pos.shape[0], device=pos.device)
    return [h[rows, pos] for h in hidden_states]


def loss_counts(batch: dict, cfg: Config) -> dict[str, int]:
    """Normalisers of the parts' shares of the global batch: the teacher's and the student's CE
    target tokens, and the rows (distillation is one value per row)."""
    return {"ce_teacher": int((batch["teacher_suffix_labels"] != IGNORE_INDEX).sum()),
            "ce_student": int((batch["student_suffix_labels"] != IGNORE_INDEX).sum()),
            "distill": int(batch["teacher_pos"].shape[0])}


def _question_once(lm, b: dict):
    """One forward over question + <bot> (the student's prompt, left-padded so <bot> is the last
    column of every row); the teacher continues from a branch of its cache with <bot> hidden, so
    it sees exactly [question ; CoT + answer] at the same positions as in a forward of its own.

    Returns (teacher logits aligned with its suffix labels [B, Ts, V], the teacher's hidden states
    per layer over its suffix [B, Ts, d], the student's state after <bot>). Gradients of both
    branches flow into the one question encoding. With LoRA dropout on, both branches see the
    question under one dropout mask (two passes drew two): the same expected gradient, and the
    distillation no longer compares two differently-perturbed encodings of the same question.
    """
    # Column -2 (the question's last token) predicts the teacher's first target; nothing else is read.
    prompt, state = forward_step(lm, embed(lm, b["student_prompt_ids"]), b["student_prompt_mask"], None,
                                 logits_to_keep=2)
    teacher, _ = forward_step(lm, embed(lm, b["teacher_suffix_ids"]), b["teacher_suffix_mask"],
                              branch(state, hide_last=1))
    return suffix_logits(prompt.logits[:, -2:-1], teacher.logits), teacher.hidden_states, state


def _teacher_alone(lm, b: dict):
    """The teacher's own forward over [question ; CoT + answer] (the two-pass reference): same
    returns as `_question_once`, without the student's state."""
    ids = torch.cat([b["teacher_prompt_ids"], b["teacher_suffix_ids"]], dim=1)     # [B, Tp + Ts]
    mask = torch.cat([b["teacher_prompt_mask"], b["teacher_suffix_mask"]], dim=1)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
             use_cache=False, output_hidden_states=True)
    tp = b["teacher_prompt_ids"].shape[1]
    return out.logits[:, tp - 1: -1], [h[:, tp:] for h in out.hidden_states]


def run(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext) -> MethodOutput:
    cc = cfg.method.codi
    lm = parts["lm"]
    counts = ctx.counts_for(batch, cfg, loss_counts)
    b = to_device(batch, model_device(lm))
    if cc.shared_question_pass:
        t_logits, t_hidden, state = _question_once(lm, b)
    else:
        t_logits, t_hidden = _teacher_alone(lm, b)
        _, state = forward_step(lm, embed(lm, b["student_prompt_ids"]), b["student_prompt_mask"], None, logits_to_keep=1)
    t_loss, t_mask = token_ce(t_logits, b["teacher_suffix_labels"])
    teacher_h = [h.detach() for h in _gather(t_hidden, b["teacher_pos"])]        # the target, never trained

    # Student: after question + <bot>, n projected latents over the KV cache, then <eot> + answer.
    # Only the last latent's logits are read (they predict <eot>, which is given: label ignored).
    projection = optional_part(parts, "projection")
    latents, state, outs = rollout_latents(lm, state, b["num_latents"], project=projection, logits_to_keep=1)
    student, _ = forward_step(lm, embed(lm, b["student_suffix_ids"]), b["student_suffix_mask"], state)
    s_loss, s_mask = token_ce(suffix_logits(outs[-1].logits[:, -1:], student.logits), b["student_suffix_labels"])
    student_h = _gather(student.hidden_states, b["student_pos"])

    distill_rows = layerwise_distill(student_h, teacher_h, kind=cc.distill_loss, reduction="none",
                                     normalize_by_teacher_std=cc.normalize_by_teacher_std,
                                     std_over=cc.teacher_std)                          # [B]
    ce_teacher, ce_student = share(t_loss, counts["ce_teacher"]), share(s_loss, counts["ce_student"])
    distill = share(distill_rows, counts["distill"])
    loss = cc.alpha * ce_student + cc.beta * distill + cc.gamma * ce_teacher
    with torch.no_grad():
        per_row = {"ce_student": reduce_tokens(s_loss, s_mask, "none"),
                   "ce_teacher": reduce_tokens(t_loss, t_mask, "none"),
                   "distill": distill_rows.detach(),
                   # without any std: a value of the row alone, whatever teacher_std says
                   "distill_raw": layerwise_distill(student_h, teacher_h, kind=cc.distill_loss,
                                                    normalize_by_teacher_std=False, reduction="none")}
    logs = {"ce_student": ce_student.detach(), "distill": distill.detach(), "ce_teacher": ce_teacher.detach()}
    active = torch.ones(latents.shape[:2], dtype=torch.long, device=latents.device)
    return MethodOutput(loss=loss, logs=logs, per_row=per_row, latents=latents, latent_active=active)


def compute_loss(parts: nn.ModuleDict, batch: dict, cfg: Config, ctx: StepContext):
    out = run(parts, batch, cfg, ctx)
    return out.loss, out.logs
