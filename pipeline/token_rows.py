"""Trainable embedding rows for the new latent tokens, on top of a frozen embedding (issue 12.4).

Under LoRA the embedding matrix is frozen, but the latent special tokens were just added and their
rows must learn. peft's `trainable_token_indices` does it by building a merged copy of the WHOLE
matrix (`weight.index_copy(...)`) on every embedding call, and its backward allocates a dense
vocabulary-sized gradient; with a tied LM head the copy is also kept alive for the head's backward.
At 128k x 4096 that is 1 GiB (bf16) per call, ~10 calls per latent step (benchmarks/bench_token_rows.py).

Here the rows are a small delta [k, d] added to the frozen rows only where a new token occurs:

    embedding(ids) = base(ids) + delta[slot(ids)]        slot(ids) = k (a zero row) for other ids
    tied head:       logits[..., new] += hidden @ delta.T

so a call costs one [.., d] gather and add, and the gradient is [k, d]. A delta rather than peft's
replacement copy: the frozen rows are rebuilt deterministically (fixed-seed statistics init, or the
run's seed for tiny models), every frozen weight already depends on that, and with a delta
`coconut.init_from`'s loaded rows stay in force (delta 0) without a refresh.

ZeRO-3: the delta lives in its own module (`TokenRowsDelta`) and is read only inside that module's
forward, which DeepSpeed's hooks gather around, also when the tied head calls it. Untied output
embeddings keep their new rows frozen (as with peft, which adapts only the input embedding unless
tied). Export folds the delta into the base matrix and removes the wrappers, giving a plain
transformers model: peft's `merge_and_unload()` / `unload()` do it through the wrappers'
`unload_and_optionally_merge_module` (peft's hook for wrapped modules), `merge_token_rows` outside peft.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class TokenRowsDelta(nn.Module):
    """`weight` [k, d]: the learned change of the rows of `token_ids` (sorted), zero at start."""

    def __init__(self, token_ids: list[int], dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        ids = sorted(set(int(i) for i in token_ids))
        # Not persistent: rebuilt from the tokenizer, so checkpoints hold only the trained weight.
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        self.weight = nn.Parameter(torch.zeros(len(ids), dim, dtype=dtype, device=device))

    def slots(self, ids: Tensor) -> Tensor:
        """Row of the delta for each id, k (out of range of `weight`) for ids that are not new."""
        k = self.token_ids.numel()
        pos = torch.searchsorted(self.token_ids, ids).clamp_(max=k - 1)
        return torch.where(self.token_ids[pos] == ids, pos, k)

    def forward(self, x: Tensor, base_out: Tensor, head: bool = False) -> Tensor:
        if head:
            # x: hidden [.., d]; base_out: logits [.., V]. In place: the head's backward needs its
            # input and weight, not its output, so autograd allows it, and no [.., V] copy is made.
            extra = x.to(self.weight.dtype) @ self.weight.t()
            return base_out.index_add_(-1, self.token_ids, extra.to(base_out.dtype))
        padded = torch.cat([self.weight, self.weight.new_zeros(1, self.weight.shape[1])])     # [k+1, d]
        return base_out + nn.functional.embedding(self.slots(x), padded).to(base_out.dtype)


class TokenRowsEmbedding(nn.Module):
    """The frozen embedding (`base_layer`) plus `trainable_tokens_delta` on the new rows."""

    def __init__(self, base_layer: nn.Embedding, token_ids: list[int]) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.trainable_tokens_delta = TokenRowsDelta(token_ids, w.shape[1], w.dtype, w.device)

    # What transformers and this pipeline read from an input embedding.
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self):
        return self.base_layer.padding_idx

    @torch.no_grad()
    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False,
                                           adapter_names=None) -> nn.Embedding:
        """peft's unload hook (its `unload()` / `merge_and_unload()` call it on every module with a
        `base_layer`): the delta is folded into the matrix in BOTH cases, because the rows are part
        of the model, not of a LoRA adapter file; dropping them would silently lose training."""
        weight = self.base_layer.weight
        delta = self.trainable_tokens_delta
        weight.index_add_(0, delta.token_ids, delta.weight.to(weight.dtype))
        return self.base_layer

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.base_layer(input_ids)
        delta = self.trainable_tokens_delta
        scale = getattr(self.base_layer, "embed_scale", None)    # scaled embeddings (Gemma): scale the delta too
        if scale is not None:
            return out + (delta(input_ids, torch.zeros_like(out)) * scale.to(out.dtype))
        return delta(input_ids, out)


class TokenRowsHead(nn.Module):
    """A tied LM head (`base_layer`, sharing the embedding matrix) that also applies the delta."""

    def __init__(self, base_layer: nn.Linear, delta: TokenRowsDelta) -> None:
        super().__init__()
        self.base_layer = base_layer
        # A list hides the delta from named_modules/state_dict: it is registered once, under the
        # embedding (one parameter, one checkpoint name, one ZeRO-3 partition).
        self._delta = [delta]

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False,
                                           adapter_names=None) -> nn.Linear:
        """peft's unload hook: the plain head; the embedding's hook folds the delta into the shared matrix."""
        return self.base_layer

    def forward(self, hidden: Tensor) -> Tensor:
        return self._delta[0](hidden, self.base_layer(hidden), head=True)


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def add_token_rows(model, token_ids: list[int]) -> TokenRowsDelta:
    """Wrap `model`'s input embedding (and a tied output embedding) so the rows of `token_ids`
    train through a [k, d] delta while the matrix stays frozen. Returns the delta module."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, TokenRowsEmbedding):
        raise ValueError("the model's embedding already has trainable token rows")
    tied = _is_tied(model)
    wrapper = TokenRowsEmbedding(embedding, token_ids)
    embedding.weight.requires_grad_(False)
    model.set_input_embeddings(wrapper)
    if tied:
        model.set_output_embeddings(TokenRowsHead(model.get_output_embeddings(), wrapper.trainable_tokens_delta))
    wrapper.trainable_tokens_delta.weight.requires_grad_(True)
    return wrapper.trainable_tokens_delta


def token_rows(model) -> TokenRowsDelta | None:
    """The delta module of a model (peft-wrapped or not), None when it has none."""
    for module in model.modules():
        if isinstance(module, TokenRowsDelta):
            return module
    return None


def merge_token_rows(model):
    """Fold the delta into the base embedding rows and restore the plain modules; returns `model`
    (unchanged when it has no token rows). peft's `unload()` and `merge_and_unload()` do the same
    through `unload_and_optionally_merge_module`; this is for a model outside peft."""
    for holder in [model, *model.modules()]:
        get_in, set_in = getattr(holder, "get_input_embeddings", None), getattr(holder, "set_input_embeddings", None)
        if get_in is None or set_in is None:
            continue
        try:
            embedding = get_in()
        except (NotImplementedError, AttributeError):
            continue
        if not isinstance(embedding, TokenRowsEmbedding):
            continue
        head = holder.get_output_embeddings() if hasattr(holder, "get_output_embeddings") else None
        set_in(embedding.unload_and_optionally_merge_module())
        if isinstance(head, TokenRowsHead):
            holder.set_output_embeddings(head.base_layer)
    return model
