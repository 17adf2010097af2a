"""Token-level batching shared by every method: segments, padding, labels, the answer position.

A training sequence is `prompt` (left-padded, so every row reaches the start token or the end of
the question at the same column) followed by `suffix` (right-padded). Only suffix tokens carry
labels. The text of each segment comes from the conventions in `pipeline.latent`
(`question_prompt`, `answer_text`, `cot_text`), which evaluation uses too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.latent import ANSWER_PREFIX, answer_text, left_pad, model_device, question_prompt, right_pad  # noqa: F401 (model_device re-exported for methods)
from pipeline.losses import IGNORE_INDEX


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a segment that follows something: no BOS/EOS added."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def encode_prompt(tokenizer, question: str) -> list[int]:
    """The question prompt as evaluation tokenizes it (`tokenizer(prompt)`: BOS if the tokenizer
    adds one), so training and inference see the same ids."""
    return list(tokenizer(question_prompt(question)).input_ids)


def first_answer_token(tokenizer, text: str, prefix_len: int) -> int:
    """Index of the first token of `text` that holds a character at or after `prefix_len`.

    Found from the tokenization, for any tokenizer: GPT-2 merges the space into "Ġ18", so the
    first answer token follows ':'; SmolLM2/LLaMA-3 give a lone "Ġ" before the digits, so it
    follows that "Ġ". Fast tokenizers give character offsets; others are decoded prefix by prefix.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = list(enc.input_ids)
    if tokenizer.is_fast:
        for i, (_, end) in enumerate(enc.offset_mapping):
            if end > prefix_len:
                return i
    else:
        for i in range(len(ids)):
            if len(tokenizer.decode(ids[: i + 1])) > prefix_len:
                return i
    raise ValueError(f"no token of {text!r} reaches past character {prefix_len}: empty answer?")


def answer_segment(tokenizer, answer: str) -> tuple[list[int], int]:
    """Ids of `ANSWER_PREFIX + answer` (no EOS) and the index of the answer's first token in them."""
    text = answer_text(answer)
    if len(text) <= len(ANSWER_PREFIX):
        raise ValueError(f"empty answer {answer!r}")
    first = first_answer_token(tokenizer, text, len(ANSWER_PREFIX))
    if first == 0:
        raise ValueError(f"the answer of {text!r} merged into the first token; no position predicts it")
    return encode(tokenizer, text), first


def pad_batch(prompts: list[list[int]], suffixes: list[list[int]], labels: list[list[int]], pad_id: int,
              prefix: str = "") -> dict[str, Tensor]:
    """Left-pad prompts, right-pad suffixes and their labels (IGNORE_INDEX where padded).

    Returns `{prefix}prompt_ids/prompt_mask` [B, Tp] and `{prefix}suffix_ids/suffix_mask/
    suffix_labels` [B, Ts].
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    suffix_ids, suffix_mask = right_pad(suffixes, pad_id)
    suffix_labels, _ = right_pad(labels, IGNORE_INDEX)
    return {f"{prefix}prompt_ids": prompt_ids, f"{prefix}prompt_mask": prompt_mask,
            f"{prefix}suffix_ids": suffix_ids, f"{prefix}suffix_mask": suffix_mask,
            f"{prefix}suffix_labels": suffix_labels}


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors moved to `device`; python metadata (step texts, counts) passed through."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def optional_part(parts, name: str):
    """parts[name] or None (nn.ModuleDict has no .get())."""
    return dict(parts.items()).get(name)


def suffix_logits(prev_last: Tensor, suffix: Tensor) -> Tensor:
    """Logits aligned with the suffix tokens: [the chunk before's last column ; suffix[:, :-1]].

    prev_last [B, 1, V] predicts suffix token 0; suffix [B, Ts, V] → [B, Ts, V]. The last column
    before the suffix is real in every row (left-padded prompts), or a latent column whose label is
    ignored anyway (the end-of-latents token is given, not predicted).
    """
    return torch.cat([prev_last, suffix[:, :-1]], dim=1)
