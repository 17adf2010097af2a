"""Issue 10.10: the latent rollout passes the KV cache under the name transformers keeps (`cache`),
so no deprecation warning about `past_key_values` (removed in transformers 5.40) is raised."""
import warnings

import torch

from pipeline.latent import forward_step, rollout_latents
from transformers import LlamaConfig, LlamaForCausalLM


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=50, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_rollout_raises_no_past_key_values_deprecation():
    model = _tiny()
    ids = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out, state = forward_step(model, model.get_input_embeddings()(ids), mask, None)
            _, state, _ = rollout_latents(model, state, 3)
    msgs = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not msgs, msgs
    assert state.past_key_values is not None and state.past_key_values.get_seq_length() == 7


def test_cached_rollout_matches_full_forward():
    """The cache really is used: a cached step after a prefix equals the full forward's last logits."""
    model = _tiny()
    ids = torch.tensor([[1, 3, 4, 5, 6]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        _, state = forward_step(model, model.get_input_embeddings()(ids[:, :4]), mask[:, :4], None)
        out, _ = forward_step(model, model.get_input_embeddings()(ids[:, 4:]), mask[:, 4:], state)
    torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-5, atol=1e-5)
