"""SoftCoT++ pieces: trainable initial tokens, S thought sets in one batch, the contrastive loss.

    initial tokens  E = [e_1 … e_S] (nn.Embedding(S, d_assist)), initialised from unused rows of the
                    assistant's embedding (`initial_token_rows`), trained (fp32 master weights)
    set s           the assistant input with each of its N placeholder embeddings replaced by e_s
    batch layout    row b·S + s = question b, set s (`repeat_interleave(S)`): the assistant and the
                    base each run ONE forward over B·S rows
    contrastive     InfoNCE over the S projected thought blocks of a question: anchor = block s
                    flattened [N·d], positive = a dropout view of itself, negatives = the question's
                    other S−1 blocks; cosine / temperature (0.05)

The reference runs the assistant under no_grad, so its "specialised" initial tokens never train,
and indexes a per-question tensor it has overwritten, so it crashes at batch size > 1. Here the
assistant's weights stay frozen (requires_grad=False) but its forward keeps the graph, so gradients
reach the initial tokens through it, and every tensor keeps its batch dimension.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models import LATENT_TOKENS

# Rows an assistant's tokenizer reserves and a text model never sees, per tokenizer family:
# LLaMA-3.x "<|reserved_special_token_N|>" (≈250 rows), Gemma "<unusedN>", and Qwen2/2.5's
# vision/grounding markers, which its text-only instruct models never emit (11 rows, enough for the
# published S = 10). Rows past the tokenizer in a padded embedding (Qwen's 151,665 → 151,936) would
# qualify too, but loading resizes the embedding to the tokenizer, so they are gone by then.
_RESERVED_NAME = re.compile(r"^<\|?(reserved_special_token_\d+|reserved_\d+|unused\d+)\|?>$")
_QWEN_UNUSED = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                "<|video_pad|>")


def _numeric_key(token: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", token)
    return (int(digits[-1]) if digits else 0, token)


def initial_token_rows(tokenizer, count: int, explicit: list[str] | None = None,
                       where: str = "method.softcot.num_thought_sets") -> tuple[list[int], list[str]]:
    """(row ids, token names) of `count` unused assistant rows to initialise the initial tokens from.

    `explicit` (method.softcot.initial_tokens) names them; otherwise the tokenizer's reserved/unused
    tokens are taken in order, skipping any its chat template or special-token map uses.
    """
    vocab = tokenizer.get_vocab()
    if explicit is not None:
        missing = [t for t in explicit if t not in vocab]
        if missing:
            raise ValueError(f"method.softcot.initial_tokens: {missing} are not single tokens of the assistant's "
                             f"tokenizer ({type(tokenizer).__name__}, {len(vocab)} tokens)")
        return [vocab[t] for t in explicit], list(explicit)
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else " ".join(map(str, template.values()))
    used = set(getattr(tokenizer, "all_special_tokens", [])) - set(_special_extras(tokenizer))
    used |= set(LATENT_TOKENS.values())
    candidates = sorted((t for t in vocab if (_RESERVED_NAME.match(t) or t in _QWEN_UNUSED)
                         and t not in used and t not in template), key=_numeric_key)
    if len(candidates) < count:
        raise ValueError(
            f"{where}={count}: SoftCoT++ initialises one initial token per thought set from an unused row of the "
            f"assistant's embedding, but its tokenizer ({type(tokenizer).__name__}, {len(vocab)} tokens) has "
            f"{len(candidates)} (looked for <|reserved_special_token_N|> of LLaMA-3, <unusedN> of Gemma, Qwen2's "
            f"unused vision/grounding tokens); name {count} tokens with method.softcot.initial_tokens=[...]")
    chosen = candidates[:count]
    return [vocab[t] for t in chosen], chosen


def _special_extras(tokenizer) -> list[str]:
    """Extra special tokens that are only declared, not used (LLaMA-3 lists its reserved ones there)."""
    extra = getattr(tokenizer, "extra_special_tokens", None) or getattr(tokenizer, "additional_special_tokens", None)
    return list(extra or [])


def make_initial_tokens(assistant: nn.Module, rows: list[int]) -> nn.Embedding:
    """nn.Embedding(S, d_assist) holding copies of the assistant's rows `rows`, in fp32 (master weights)."""
    weight = assistant.get_input_embeddings().weight.detach()[rows].float().clone()
    emb = nn.Embedding(len(rows), weight.shape[1])
    with torch.no_grad():
        emb.weight.copy_(weight)
    return emb


def fill_slots(embeds: Tensor, initial: Tensor, n: int, sets: int) -> Tensor:
    """Repeat every row `sets` times (row b·S + s) and overwrite its last `n` columns (the placeholder
    slots: inputs are left-padded) with set s's initial embedding.

    embeds [B, T, d], initial [S, d] → [B·S, T, d]; differentiable in `initial`.
    """
    rows = embeds.repeat_interleave(sets, dim=0)                               # [B·S, T, d]
    per_row = initial.to(rows.dtype).repeat(embeds.shape[0], 1)                # [B·S, d]: row b·S+s → e_s
    slot = torch.zeros(rows.shape[1], dtype=torch.bool, device=rows.device)
    if n:
        slot[-n:] = True
    return torch.where(slot[None, :, None], per_row[:, None, :], rows)


def info_nce(anchors: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """Mean InfoNCE over B questions × S sets: for set s of question b, the logits are
    cos(anchor_bs, positive_bj) / temperature over j = 1 … S, the target j = s.

    anchors, positives [B, S, D] → scalar.
    """
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    logits = torch.einsum("bsd,bjd->bsj", a, p) / temperature                   # [B, S, S]
    b, s, _ = logits.shape
    target = torch.arange(s, device=logits.device).repeat(b)
    return F.cross_entropy(logits.reshape(b * s, s), target)


def contrastive_loss(thoughts: Tensor, sets: int, temperature: float, dropout: float, training: bool) -> Tensor:
    """InfoNCE across the S projected thought blocks of each question.

    thoughts [B·S, N, d] (row b·S + s) → scalar. The positive of block s is dropout(block s) (gradient
    flows through both views, as in the reference); in eval mode the view is the block itself.
    """
    blocks = thoughts.float().reshape(-1, sets, thoughts.shape[1] * thoughts.shape[2])    # [B, S, N·d]
    view = F.dropout(blocks, p=dropout, training=training)
    return info_nce(blocks, view, temperature)
