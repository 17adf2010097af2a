"""Batched generation for evaluation: `prompt + start`, n latents over the KV cache, `end`, decoding.

Every forward asks only for what is used (issue 12.5):

* the prompt prefill and the latent steps feed the next latent, so they run the decoder body alone
  (the last hidden state, no LM head, no per-layer hidden states); only the forward whose output
  starts decoding (the end token's, or the prompt's / last latent's when there is no end token)
  and the decode steps compute logits, for the last position only, with no hidden states;
* left-padded prompts of mixed lengths waste most of a large batch's prefill (GSM8k prompts of
  57-295 tokens: 64 x 295 padded positions for ~64 x 131 real ones), so the prompts are prefilled
  in a few length buckets and their caches merged into one left-padded cache. A row's result does
  not depend on its bucket: padding columns are masked and position ids count real tokens only;
* decoding keeps the generated ids as tensors and reads them back once at the end (no per-row
  Python loop and no `.tolist()` per token); the only per-step sync is "is every row done?".

Rows stay independent of each other (batch 1 == batch 64 predictions) and each row samples from
its own generator when given one per row (`sample_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pipeline.latent import RolloutState, embed, forward_step, left_pad, model_device, rollout_latents

# The prefill is split into at most this many length buckets; more forwards cost per-call overhead.
PREFILL_BUCKETS = 4
# ... and only when that saves at least this fraction of the padded prefill tokens.
MIN_PREFILL_SAVING = 0.15


@dataclass
class LatentGeneration:
    texts: list[str]
    token_ids: list[list[int]]
    num_generated: list[int]
    latents: Tensor          # [B, n, d] latent inputs
    latent_hidden: Tensor    # [B, n, d] last hidden states the latents were made from


@torch.no_grad()
def generate_with_latents(model, tokenizer, prompts: list[str], *, num_latents: int,
                          start_token: str | None, end_token: str | None,
                          projection: Callable[[Tensor], Tensor] | None = None, max_new_tokens: int = 64,
                          do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                          generator: torch.Generator | list[torch.Generator] | None = None,
                          all_done: Callable[[bool], bool] | None = None) -> LatentGeneration:
    """`prompt + start`, `num_latents` latents, `end`, then decode until EOS per row.

    With `num_latents=0` and no start/end tokens this is plain explicit decoding, with the same
    batch-invariant masking. The batch ends when every row has produced EOS; `all_done(local)`,
    when given, turns this rank's answer into the answer of all ranks (validation under ZeRO-3,
    where every rank must make the same forward calls).
    """
    device = model_device(model)
    ids = [tokenizer(p).input_ids for p in prompts]
    if start_token is not None:
        ids = [seq + [tokenizer.convert_tokens_to_ids(start_token)] for seq in ids]
    # Which forward's logits start decoding: the end token's, else the last latent's, else the prompt's.
    logits_from = "end" if end_token is not None else ("latent" if num_latents else "prompt")
    # Collective generation (ZeRO-3 validation) needs the same forward calls on every rank: one
    # prefill, not one per length bucket (the buckets depend on this rank's prompts).
    state, logits = prefill(model, ids, tokenizer.pad_token_id, logits=logits_from == "prompt",
                            max_buckets=PREFILL_BUCKETS if all_done is None else 1)
    hidden_before: list[Tensor] = []
    if num_latents:
        latents, state, last_logits = _latents(model, state, num_latents, projection, hidden_before,
                                               logits=logits_from == "latent")
        logits = last_logits if last_logits is not None else logits
    else:
        latents = embed(model, torch.zeros(len(prompts), 0, dtype=torch.long, device=device))     # [B, 0, d]
    if end_token is not None:
        end = torch.full((len(prompts), 1), tokenizer.convert_tokens_to_ids(end_token), device=device)
        out, state = forward_step(model, embed(model, end), torch.ones_like(end), state,
                                  output_hidden_states=False, logits_to_keep=1)
        logits = out.logits[:, -1]
    stop = torch.tensor(sorted(stop_token_ids(model, tokenizer)), device=device)
    generated, counts = decode(model, state, logits, stop, max_new_tokens, do_sample=do_sample,
                               temperature=temperature, top_p=top_p, generator=generator, all_done=all_done)
    stop_ids = set(stop.tolist())
    texts = [tokenizer.decode([t for t in g if t not in stop_ids], skip_special_tokens=True) for g in generated]
    hidden = torch.stack(hidden_before, 1) if hidden_before else latents
    return LatentGeneration(texts=texts, token_ids=generated, num_generated=counts, latents=latents,
                            latent_hidden=hidden)


def decode(model, state: RolloutState, logits: Tensor, stop: Tensor, max_new_tokens: int, *,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           generator=None, all_done: Callable[[bool], bool] | None = None) -> tuple[list[list[int]], list[int]]:
    """Pick a token from `logits` [B, V], feed it over the cache, repeat until every row has picked a
    stop id or `max_new_tokens`. Returns each row's ids up to and including its first stop id, and
    their counts. Finished rows keep being fed (their picks are dropped) so the batch keeps its shape."""
    picks, done = [], torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        next_ids = _pick(logits.float(), do_sample, temperature, top_p, generator)      # [B]
        picks.append(next_ids)
        done |= torch.isin(next_ids, stop)
        if step == max_new_tokens - 1 or (all_done or bool)(bool(done.all())):   # the one sync per step
            break
        column = next_ids[:, None]
        out, state = forward_step(model, embed(model, column), torch.ones_like(column), state,
                                  output_hidden_states=False, logits_to_keep=1)
        logits = out.logits[:, -1]
    if not picks:
        return [[] for _ in range(logits.shape[0])], [0] * logits.shape[0]
    ids = torch.stack(picks, dim=1)                                                   # [B, S]
    is_stop = torch.isin(ids, stop)
    first_stop = is_stop.int().argmax(-1)
    counts = torch.where(is_stop.any(-1), first_stop + 1, ids.shape[1])
    rows, counts = ids.tolist(), counts.tolist()                                      # one read-back
    return [row[:n] for row, n in zip(rows, counts)], counts


# --------------------------------------------------------------------------- prefill
def prefill(model, ids: list[list[int]], pad_id: int, *, logits: bool,
            max_buckets: int = PREFILL_BUCKETS) -> tuple[RolloutState, Tensor | None]:
    """Encode left-padded prompts (token id lists) → (state over all rows, last-position logits
    [B, V] when `logits`, else None and the state's `last_hidden` set), bucketed by length."""
    device = model_device(model)
    buckets = length_buckets([len(s) for s in ids], max_buckets)
    results = []
    for rows in buckets:
        prompt_ids, mask = left_pad([ids[r] for r in rows], pad_id)
        out, state = forward_step(model, embed(model, prompt_ids.to(device)), mask.to(device), None,
                                  output_hidden_states=False, logits_to_keep=1 if logits else 0, logits=logits)
        results.append((rows, state, out.logits[:, -1] if logits else None))
        if len(buckets) > 1 and not _mergeable(state.past_key_values):
            # A cache layout we cannot splice (sliding-window, quantised, ...): one padded batch.
            return prefill(model, ids, pad_id, logits=logits, max_buckets=1)
    if len(results) == 1:
        return results[0][1], results[0][2]
    return _merge(results, len(ids), device)


def length_buckets(lengths: list[int], max_buckets: int) -> list[list[int]]:
    """Row indices in at most `max_buckets` groups of similar length that minimise the padded token
    count (sum over groups of rows x longest), by dynamic programming over the sorted lengths. One
    group when that saves less than MIN_PREFILL_SAVING of the single padded batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n, single = len(sizes), len(sizes) * max(sizes, default=0)
    if n < 2 or max_buckets < 2 or single == 0:
        return [list(range(n))]
    inf = float("inf")
    # best[g][j]: fewest padded tokens for the j shortest rows in g groups; cut[g][j]: where the last group starts.
    best = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for g in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            width = sizes[j - 1]
            for i in range(g - 1, j):
                cost = best[g - 1][i] + (j - i) * width
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    # Each bucket is one more forward (per-call overhead the token count does not see): take the
    # fewest buckets within 5% of the best.
    fewest = min(best[g][n] for g in range(1, max_buckets + 1))
    groups = next(g for g in range(1, max_buckets + 1) if best[g][n] <= 1.05 * fewest)
    if best[groups][n] > (1 - MIN_PREFILL_SAVING) * single:
        return [list(range(n))]
    bounds, j = [], n
    for g in range(groups, 0, -1):
        bounds.append((cut[g][j], j))
        j = cut[g][j]
    return [sorted(order[a:b]) for a, b in reversed(bounds) if b > a]


def _mergeable(cache) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _merge(results, batch: int, device) -> tuple[RolloutState, Tensor | None]:
    """Bucket states → one state over all rows in their original order, left-padded to the widest
    bucket (the extra columns masked, their keys and values zero)."""
    width = max(state.attention_mask.shape[1] for _, state, _ in results)
    first = results[0][1]
    mask = first.attention_mask.new_zeros(batch, width)
    next_position = first.next_position.new_zeros(batch)
    hidden = None if first.last_hidden is None else first.last_hidden.new_zeros(batch, first.last_hidden.shape[-1])
    logits = None if results[0][2] is None else results[0][2].new_zeros(batch, results[0][2].shape[-1])
    cache = first.past_key_values
    merged = [[None, None] for _ in cache.layers]
    for rows, state, row_logits in results:
        index = torch.tensor(rows, device=device)
        w = state.attention_mask.shape[1]
        mask[index, width - w:] = state.attention_mask
        next_position[index] = state.next_position
        if hidden is not None:
            hidden[index] = state.last_hidden
        if logits is not None:
            logits[index] = row_logits
        for layer, slot in zip(state.past_key_values.layers, merged):
            for k, tensor in enumerate((layer.keys, layer.values)):
                if slot[k] is None:
                    slot[k] = tensor.new_zeros(batch, tensor.shape[1], width, tensor.shape[3])
                slot[k][index, :, width - w:] = tensor
    for layer, (keys, values) in zip(cache.layers, merged):
        layer.keys, layer.values = keys, values
    return RolloutState(past_key_values=cache, attention_mask=mask, next_position=next_position,
                        last_hidden=hidden), logits


# --------------------------------------------------------------------------- latents and sampling
def _latents(model, state: RolloutState, num_latents: int, projection, record: list, *, logits: bool):
    """The latent rollout of generation: body-only steps (the next latent needs the last hidden
    state, nothing else); with `logits` the last step computes the first decode logits instead.
    `record` receives the hidden states the latents are made from. Returns (latents, state, logits)."""
    def project(h: Tensor) -> Tensor:
        record.append(h)
        return projection(h) if projection is not None else h
    body_steps = num_latents - 1 if logits else num_latents
    latents, state, _ = rollout_latents(model, state, body_steps, project=project, logits=False)
    if not logits:
        return latents, state, None
    last, state, outs = rollout_latents(model, state, 1, project=project, logits_to_keep=1)
    return torch.cat([latents, last], dim=1), state, outs[-1].logits[:, -1]


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS of the tokenizer plus every end id of the model's generation config (instruct models
    often have several, e.g. `<|eot_id|>` and `<|end_of_text|>`)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return {i for i in ids if i is not None}


def sample_rows(probs: Tensor, generator) -> Tensor:
    """One draw per row of `probs` [B, V] → ids [B].

    `generator` may be one torch.Generator for the batch or a list with one per row: each row then
    draws from its own stream exactly once per call, so its sample does not depend on which other
    rows share the batch (evaluation seeds each row by seed, benchmark and instance id).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(probs[i: i + 1], 1, generator=g) for i, g in enumerate(generator)]
                         ).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return sample_rows(probs, generator)
