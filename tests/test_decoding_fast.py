"""Issue 12.5: generation computes only the last position's logits; predictions are unchanged.

Reference: a greedy decode that re-runs the full sequence (prompt + start + latents + end +
generated tokens, no cache, full logits) for every new token, kept here."""
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.latent import generate_with_latents

START, END, EOS = 40, 41, 2


class Tok:
    pad_token_id, eos_token_id = 0, EOS

    def __call__(self, text):
        return types.SimpleNamespace(input_ids=[3 + (ord(c) % 30) for c in text])

    def convert_tokens_to_ids(self, t):
        return {"<s>": START, "<e>": END}[t]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=48, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = EOS
    return model


@torch.no_grad()
def _reference(model, tok, prompt, n, steps):
    """Batch-1, no-cache decode: each step runs the whole sequence as embeddings."""
    emb = model.get_input_embeddings()
    seq = emb(torch.tensor([tok(prompt).input_ids + [START]]))
    for _ in range(n):
        h = model(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1:]
        seq = torch.cat([seq, h], 1)
    seq = torch.cat([seq, emb(torch.tensor([[END]]))], 1)
    out = []
    for _ in range(steps):
        nxt = int(model(inputs_embeds=seq).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == EOS:
            break
        seq = torch.cat([seq, emb(torch.tensor([[nxt]]))], 1)
    return out


@pytest.mark.parametrize("n", [0, 3])
def test_generation_matches_full_forward_reference(n):
    model, tok = _model(), Tok()
    prompts = ["12+7=?", "a much longer question about apples", "x"]
    got = generate_with_latents(model, tok, prompts, num_latents=n, start_token="<s>", end_token="<e>",
                                max_new_tokens=8)
    for i, p in enumerate(prompts):
        assert got.token_ids[i] == _reference(model, tok, p, n, 8), i


def test_decode_requests_only_last_logits():
    model, tok = _model(), Tok()
    shapes = []
    orig = model.forward

    def spy(*a, **kw):
        out = orig(*a, **kw)
        shapes.append(tuple(out.logits.shape))
        return out
    model.forward = spy
    generate_with_latents(model, tok, ["12+7=?", "abc"], num_latents=2, start_token="<s>", end_token="<e>",
                          max_new_tokens=3)
    assert shapes and all(s[1] == 1 for s in shapes), shapes
