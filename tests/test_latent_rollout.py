"""The KV-cache latent rollout equals one full-sequence forward, and is batch invariant."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from pipeline.latent import forward_step, left_pad, positions_from_mask, rollout_latents


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=50, max_position_embeddings=128)
    else:
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=128,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def projection(d):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d), torch.nn.LayerNorm(d))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rollout_equals_full_sequence_forward(arch):
    model = tiny(arch)
    proj = projection(32)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    suffix = [[13, 14, 15], [16], [17, 18]]
    ids, mask = left_pad(prompts, pad_id=0)
    emb = model.get_input_embeddings()
    # Row 1 uses only 2 of the 3 latent slots: its third column is masked.
    active = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    _, state = forward_step(model, emb(ids), mask, None)
    latents, state, _ = rollout_latents(model, state, 3, project=proj, active=active)
    from pipeline.latent import right_pad
    s_ids, s_mask = right_pad(suffix, 0)
    out, _ = forward_step(model, emb(s_ids), s_mask, state)

    # Reference: one forward over [prompt ; latents ; suffix] embeddings with the same mask.
    full_emb = torch.cat([emb(ids), latents, emb(s_ids)], dim=1)
    full_mask = torch.cat([mask, active, s_mask], dim=1)
    ref = model(inputs_embeds=full_emb, attention_mask=full_mask, position_ids=positions_from_mask(full_mask),
                output_hidden_states=True)
    t = ids.shape[1] + 3
    real = s_mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[:, t:][real], atol=1e-5, rtol=1e-5)
    for h_kv, h_ref in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(h_kv[real], h_ref[:, t:][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rollout_is_batch_invariant(arch):
    model = tiny(arch)
    proj = projection(32)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [8, 9], [10, 11, 12]]
    emb = model.get_input_embeddings()

    def run(rows):
        ids, mask = left_pad(rows, 0)
        _, state = forward_step(model, emb(ids), mask, None)
        latents, state, _ = rollout_latents(model, state, 4, project=proj)
        return latents, state.last_hidden

    batch_latents, batch_last = run(prompts)
    for i, row in enumerate(prompts):
        alone_latents, alone_last = run([row])
        torch.testing.assert_close(batch_latents[i], alone_latents[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch_last[i], alone_last[0], atol=1e-5, rtol=1e-5)
