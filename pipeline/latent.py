"""The one latent rollout: KV cache, attention masks and position ids for left-padded batches.

Every method (training) and every latent adapter (evaluation) goes through these functions, so the
mechanics that decide correctness live in one place:

* prompts are left-padded, so all rows reach the start token in the same (last) column;
* every forward gets an explicit 2-D attention mask (1 = real) and explicit position ids, so a row's
  result does not depend on what else is in the batch (the reference CODI passes no mask);
* a latent is the last-layer hidden state (after the final norm) at the last position, optionally
  passed through a projection, fed back as the next input embedding over the KV cache;
* rows that use fewer latents than the batch maximum get masked latent columns whose position ids
  do not advance, so columns line up without changing the row's computation.
"""
from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def positions_from_mask(mask: Tensor, start: Tensor | None = None) -> Tensor:
    """Position ids that count only real tokens: `start + cumsum(mask) - 1`, clamped at `start`."""
    pos = mask.long().cumsum(-1) - 1
    if start is not None:
        pos = pos + start[:, None]
    floor = start[:, None] if start is not None else 0
    return torch.maximum(pos, torch.as_tensor(floor, device=mask.device))


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists → (ids [B, T], mask [B, T])."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists → (ids [B, T], mask [B, T])."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
    return ids, mask


# --------------------------------------------------------------------------- text conventions
# One place for how examples become text (docs/DESIGN.md), shared by training and evaluation.
ANSWER_PREFIX = "The answer is: "


def question_prompt(question: str) -> str:
    """The question as every method sees it: stripped, then one newline before what follows."""
    return question.strip() + "\n"


def answer_text(answer: str) -> str:
    """`ANSWER_PREFIX + answer`; the caller appends the EOS token id."""
    return ANSWER_PREFIX + str(answer).strip()


def cot_text(steps, answer: str) -> str:
    """Explicit CoT target: one step per line, then the answer line (EOS appended by the caller)."""
    return "".join(step + "\n" for step in steps) + answer_text(answer)


# SoftCoT (training in pipeline/methods/softcot.py, inference in evaluation/softcot.py): the soft
# thoughts overwrite N placeholder embeddings between two delimiter tokens at the end of the base
# model's user message.
SOFTCOT_PLACEHOLDER, SOFTCOT_BEGIN, SOFTCOT_END = "<|latent|>", "<bot>", "<eot>"

# The published SoftCoT target (GSM8K): one "## Step i:" line per natural-language solution line, then
# a boxed answer; the base prompt asks for exactly that format, so a frozen instruct model keeps its
# own register. Our wording; evaluation parses the boxed answer (strict) or the last number.
SOCRATIC_INSTRUCTION = (
    "Solve the following math problem. Reason in short steps, one line per step, written as\n"
    "## Step 1: [a brief calculation]\n## Step 2: [a brief calculation]\n...\n"
    "and finish with the line\nTherefore, the final answer is: $\\boxed{answer}$.\n"
    "where answer is only the final number.\n\nProblem: ")
SOCRATIC_THOUGHTS_PREFIX = ("\n\nA smaller assistant model wrote these soft thoughts about the problem; "
                            "use them if they help: ")


def socratic_text(lines, answer: str, answer_line: bool = True) -> str:
    """`## Step i: {line}` per solution line (+ GSM8K's `#### a` line, as the reference keeps it),
    then `Therefore, the final answer is: $\\boxed{a}$.` (no trailing newline: a chat template
    closes the turn)."""
    answer = str(answer).strip()
    steps = [str(line).strip() for line in lines] + ([f"#### {answer}"] if answer_line else [])
    return "".join(f"## Step {i}: {step}\n" for i, step in enumerate(steps, 1)) + \
        f"Therefore, the final answer is: $\\boxed{{{answer}}}$."


def softcot_assistant_text(question: str, n: int, placeholder: str, instruction: str = "",
                           initial: str = "") -> str:
    """`[initial] + instruction + question + "\n" + placeholder × n`: the assistant's input."""
    return f"{initial}{instruction}{question.strip()}\n" + placeholder * n


def _uses_template(tokenizer, chat_template: bool) -> bool:
    return chat_template and getattr(tokenizer, "chat_template", None) is not None


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text, its BOS left to the tokenizer when the tokenizer adds one itself."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def softcot_user_message(question: str, n: int, placeholder: str, begin: str, end: str, instruction: str = "",
                         thoughts_prefix: str = "") -> str:
    """`instruction + question + thoughts_prefix + begin + placeholder × n + end`."""
    return f"{instruction}{question.strip()}{thoughts_prefix}{begin}{placeholder * n}{end}"


def softcot_base_prompt(tokenizer, question: str, n: int, placeholder: str, begin: str, end: str,
                        instruction: str = "", chat_template: bool = True, thoughts_prefix: str = "") -> str:
    """The base model's prompt: the user message (`softcot_user_message`), in the tokenizer's chat
    template (generation prompt added, its BOS left to the tokenizer) when `chat_template` and the
    tokenizer has one, else followed by a newline."""
    user = softcot_user_message(question, n, placeholder, begin, end, instruction, thoughts_prefix)
    if not _uses_template(tokenizer, chat_template):
        return user + "\n"
    return _render(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True)


def softcot_assistant_turn(tokenizer, prompt: str, user: str, target: str, chat_template: bool = True) -> str:
    """The text after `prompt` that trains: the assistant turn as the chat template writes it (the
    target and the template's end-of-turn marker; trailing whitespace after it is not learnt).
    Without a template it is the bare target (the caller appends EOS)."""
    if not _uses_template(tokenizer, chat_template):
        return target
    full = _render(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": target}],
                   add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the user turn differently with an assistant turn after it; "
                         "set method.softcot.chat_template=false")
    turn = full[len(prompt):].rstrip()
    if target not in turn:
        raise ValueError(f"the chat template changed the assistant's target text: {turn[:80]!r}")
    return turn


@dataclass
class RolloutState:
    """Where a batch stands after some forwards over a KV cache."""
    past_key_values: object        # transformers Cache
    attention_mask: Tensor         # [B, T_so_far] over everything in the cache
    next_position: Tensor          # [B] position id of the next real token
    last_hidden: Tensor | None     # [B, d] last-layer hidden state at each row's last real token
                                   # (None after a step that asked for logits only)


def forward_step(model, embeds: Tensor, mask: Tensor, state: RolloutState | None,
                 output_hidden_states: bool = True, logits_to_keep: int = 0, logits: bool = True):
    """Run `model` on `embeds` [B, t, d] with mask [B, t] over the cache in `state`.

    Returns (model output, new state). Position ids continue from the state; masked (padding)
    columns do not advance them. The new `last_hidden` is taken at each row's last real column of
    this chunk (rows with no real column in it keep their previous one).

    Only what is asked for is computed (issue 12.5): `output_hidden_states` collects every layer's
    hidden states (training's distillation reads them); `logits=False` runs the decoder body alone,
    without the LM head (`out.last_hidden_state`, no `out.logits`): a step that only feeds the next
    latent needs the last hidden state, not [B, t, V] logits. With logits and no hidden states
    requested (a decode step) `last_hidden` is None.
    """
    start = state.next_position if state is not None else torch.zeros(embeds.shape[0], dtype=torch.long,
                                                                      device=embeds.device)
    position_ids = positions_from_mask(mask, start)
    full_mask = mask if state is None else torch.cat([state.attention_mask, mask], dim=1)
    cache = None if state is None else state.past_key_values
    body = None if logits else decoder_body(model)
    target = model if body is None else body
    if not logits and body is None:         # no separate body to call: the last hidden state via the outputs
        output_hidden_states = True
    kwargs = {"logits_to_keep": logits_to_keep} if body is None and logits_to_keep else {}
    out = target(inputs_embeds=embeds, attention_mask=full_mask, position_ids=position_ids,
                 **{_cache_kwarg(target): cache}, use_cache=True, output_hidden_states=output_hidden_states,
                 **kwargs)
    if body is not None:
        hidden = out.last_hidden_state                               # [B, t, d], after final norm
    else:
        hidden = out.hidden_states[-1] if output_hidden_states else None
    chunk_last = None
    if hidden is not None:
        last_col = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)   # [B]
        chunk_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_col]  # [B, d]
        if state is not None and state.last_hidden is not None:
            has_real = mask.sum(-1) > 0                              # [B]
            chunk_last = torch.where(has_real[:, None], chunk_last, state.last_hidden)
    new_state = RolloutState(past_key_values=_output_cache(out), attention_mask=full_mask,
                             next_position=start + mask.sum(-1), last_hidden=chunk_last)
    return out, new_state


def decoder_body(model):
    """The transformer stack under the LM head (LlamaModel, GPT2Model, ...; LoRA layers included
    for a peft model), or None when the model has no separate one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "base_model", None)
    return None if body is None or body is base else body


def _cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: `cache` in transformers >= 5.x models that
    deprecate `past_key_values` (removed in 5.40, FutureWarning until then), else `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)
    return _cache_kwarg_of(type(base))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls) -> str:
    # Once per class: inspect.signature on every forward call cost ~50 us per decode step.
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    """The returned cache under either name (`cache` in new transformers, `past_key_values` before)."""
    cache = out.get("cache") if hasattr(out, "get") else getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def branch(state: RolloutState, hide_last: int = 0) -> RolloutState:
    """A second continuation of the prefix held in `state`, with the last `hide_last` columns
    masked out (and position ids rewound past them): a forward on the branch grows its own cache,
    never `state`'s. Both share the prefix's key/value tensors (DynamicLayer.update concatenates
    into new tensors, never in place), so gradients from both continuations reach the prefix.

    CODI encodes question + <bot> once; the student continues from `state`, the teacher from
    `branch(state, hide_last=1)`: the question alone, as if <bot> had never been fed. The branch's
    `last_hidden` is `state`'s (a branch is continued with tokens, which set their own).
    """
    from transformers.cache_utils import DynamicLayer

    cache = copy.copy(state.past_key_values)
    layers = getattr(cache, "layers", None)
    if layers is None or not all(isinstance(layer, DynamicLayer) for layer in layers):
        raise TypeError(f"cannot branch a {type(cache).__name__}: only caches of DynamicLayers grow out of place")
    cache.layers = [copy.copy(layer) for layer in layers]
    mask = state.attention_mask
    hidden = mask[:, mask.shape[1] - hide_last:]
    return RolloutState(past_key_values=cache,
                        attention_mask=torch.cat([mask[:, :mask.shape[1] - hide_last], torch.zeros_like(hidden)], 1),
                        next_position=state.next_position - hidden.sum(-1), last_hidden=state.last_hidden)


def rollout_latents(model, state: RolloutState, num_latents: int, *,
                    project: Callable[[Tensor], Tensor] | None = None,
                    active: Tensor | None = None, logits_to_keep: int = 0,
                    logits: bool = True) -> tuple[Tensor, RolloutState, list]:
    """Feed `num_latents` continuous thoughts after the prefix already in `state`.

    active: [B, n] bool/0-1, which latent slots each row really uses (None = all). Returns
    (latent inputs [B, n, d], state after the last latent, per-step model outputs). With
    `logits=False` the steps run the decoder body only (no LM head; see `forward_step`).
    """
    latents, outputs = [], []
    batch = state.last_hidden.shape[0]
    for k in range(num_latents):
        source = state.last_hidden                                   # [B, d]
        latent = project(source) if project is not None else source
        column = (torch.ones(batch, 1, dtype=torch.long, device=latent.device) if active is None
                  else active[:, k: k + 1].long())
        # Without logits the body's last_hidden_state is all a step needs: no per-layer states.
        out, state = forward_step(model, latent[:, None, :].to(_embed_dtype(model)), column, state,
                                  output_hidden_states=logits, logits_to_keep=logits_to_keep, logits=logits)
        latents.append(latent)
        outputs.append(out)
    if not latents:
        return state.last_hidden.new_zeros(batch, 0, state.last_hidden.shape[-1]), state, outputs
    return torch.stack(latents, dim=1), state, outputs


def model_device(model) -> torch.device:
    """Where the model's input embedding (and so its inputs) lives."""
    return model.get_input_embeddings().weight.device


def _embed_dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def embed(model, ids: Tensor) -> Tensor:
    return model.get_input_embeddings()(ids)


# Generation moved to pipeline.decoding (issue 12.5); the old import paths keep working.
_MOVED_TO_DECODING = {"LatentGeneration", "generate_with_latents", "stop_token_ids", "sample_rows"}


def __getattr__(name: str):
    if name in _MOVED_TO_DECODING:
        from pipeline import decoding
        return getattr(decoding, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
