"""Issue 12.5: generation asks only for what it uses and prefills in length buckets, with the same
predictions as the implementation before it (greedy and per-row sampling) and as a no-cache
full-forward reference, batch invariant, for plain and LoRA models."""
import pytest
import torch
from test_decoding_fast import END, START, Tok, _model, _reference
from transformers import MistralConfig, MistralForCausalLM

from pipeline.decoding import generate_with_latents, length_buckets
from pipeline.latent import embed, forward_step, left_pad, model_device, rollout_latents

# Lengths 1 to ~60 characters (1 token each): several prefill buckets in one batch.
PROMPTS = ["x", "12+7=?", "a much longer question about apples and pears, " * 1, "bb", "what is 3*4?",
           "a very long question indeed, about a farmer who sells eggs at a market", "q", "seven + eight"]


def _previous_generate(model, tok, prompts, n, max_new_tokens, start=True, end=True, generator=None,
                       do_sample=False):
    """generate_with_latents as it was before issue 12.5 (one padded prefill with every hidden
    state, the latents' logits too, a per-row Python loop), for comparison."""
    from pipeline.decoding import _pick, stop_token_ids

    ids = [tok(p).input_ids + ([START] if start else []) for p in prompts]
    prompt_ids, mask = left_pad(ids, tok.pad_token_id)
    out, state = forward_step(model, embed(model, prompt_ids), mask, None, logits_to_keep=1)
    if n:
        _, state, outs = rollout_latents(model, state, n, logits_to_keep=1)
        out = outs[-1]
    if end:
        e = torch.full((len(prompts), 1), END)
        out, state = forward_step(model, embed(model, e), torch.ones_like(e), state, logits_to_keep=1)
    logits, stop = out.logits[:, -1], torch.tensor(sorted(stop_token_ids(model, tok)))
    done, generated = torch.zeros(len(prompts), dtype=torch.bool), [[] for _ in prompts]
    for _ in range(max_new_tokens):
        next_ids = _pick(logits.float(), do_sample, 1.0, 0.9, generator)
        for i in range(len(prompts)):
            if not done[i]:
                generated[i].append(int(next_ids[i]))
        done |= torch.isin(next_ids, stop)
        if bool(done.all()):
            break
        out, state = forward_step(model, embed(model, next_ids[:, None]), torch.ones(len(prompts), 1, dtype=torch.long),
                                  state, logits_to_keep=1)
        logits = out.logits[:, -1]
    return generated


def test_the_test_prompts_take_several_prefill_buckets():
    lengths = [len(Tok()(p).input_ids) + 1 for p in PROMPTS]
    assert len(length_buckets(lengths, 4)) >= 3


@pytest.mark.parametrize("n", [0, 1, 3])
def test_bucketed_generation_matches_no_cache_reference_and_previous(n):
    model, tok = _model(), Tok()
    got = generate_with_latents(model, tok, PROMPTS, num_latents=n, start_token="<s>", end_token="<e>",
                                max_new_tokens=10)
    before = _previous_generate(model, tok, PROMPTS, n, 10)
    assert got.token_ids == before
    for i, p in enumerate(PROMPTS):
        assert got.token_ids[i] == _reference(model, tok, p, n, 10), i
        assert got.num_generated[i] == len(got.token_ids[i])


def test_without_end_token_decoding_starts_from_the_last_latent():
    model, tok = _model(), Tok()
    got = generate_with_latents(model, tok, PROMPTS, num_latents=2, start_token="<s>", end_token=None,
                                max_new_tokens=6)
    assert got.token_ids == _previous_generate(model, tok, PROMPTS, 2, 6, end=False)


def test_batch_invariant_latents_and_tokens():
    model, tok = _model(), Tok()
    batch = generate_with_latents(model, tok, PROMPTS, num_latents=3, start_token="<s>", end_token="<e>",
                                  max_new_tokens=8)
    for i, p in enumerate(PROMPTS):
        alone = generate_with_latents(model, tok, [p], num_latents=3, start_token="<s>", end_token="<e>",
                                      max_new_tokens=8)
        assert alone.token_ids[0] == batch.token_ids[i]
        torch.testing.assert_close(alone.latents[0], batch.latents[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone.latent_hidden[0], batch.latent_hidden[i], rtol=1e-5, atol=1e-5)


def test_per_row_sampling_is_unchanged_and_batch_invariant():
    model, tok = _model(), Tok()

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]
    seeds = list(range(100, 100 + len(PROMPTS)))
    got = generate_with_latents(model, tok, PROMPTS, num_latents=2, start_token="<s>", end_token="<e>",
                                max_new_tokens=8, do_sample=True, top_p=0.9, generator=gens(seeds))
    assert got.token_ids == _previous_generate(model, tok, PROMPTS, 2, 8, do_sample=True, generator=gens(seeds))
    half = generate_with_latents(model, tok, PROMPTS[::2], num_latents=2, start_token="<s>", end_token="<e>",
                                 max_new_tokens=8, do_sample=True, top_p=0.9, generator=gens(seeds[::2]))
    assert half.token_ids == got.token_ids[::2]


def test_forwards_request_only_what_is_used():
    """Prefill and latents: decoder body only (no LM head, no per-layer states). End token and
    decode steps: the LM head on one position, no hidden states. No forward after the last pick."""
    model, tok = _model(), Tok()
    head_rows, calls = [], []
    model.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(tuple(i[0].shape[1:2])))
    for module, name in ((model, "lm"), (model.model, "body")):
        module.register_forward_pre_hook(
            lambda m, a, kw, name=name: calls.append((name, kw.get("output_hidden_states"))), with_kwargs=True)
    generate_with_latents(model, tok, PROMPTS, num_latents=3, start_token="<s>", end_token="<e>", max_new_tokens=5)
    own = [c for c in calls if c[0] == "lm"]
    assert len(own) == 1 + 4 and all(hs is False for _, hs in own)       # end token + 4 decode steps
    body_only = [hs for k, (name, hs) in enumerate(calls) if name == "body" and (k == 0 or calls[k - 1][0] != "lm")]
    assert len(body_only) == len(length_buckets([len(tok(p).input_ids) + 1 for p in PROMPTS], 4)) + 3
    assert all(hs is False for hs in body_only)
    assert head_rows == [(1,)] * 5


def test_lora_model_generates_as_its_merged_weights():
    """The body-only steps go through peft's LoRA layers (the decoder body of the peft model)."""
    from peft import LoraConfig, get_peft_model

    from pipeline.token_rows import add_token_rows, token_rows

    model, tok = _model(), Tok()
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    add_token_rows(lora.get_base_model(), [START, END])
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        token_rows(lora).weight.normal_(0, 1.0)
    kw = dict(num_latents=3, start_token="<s>", end_token="<e>", max_new_tokens=8)
    got = generate_with_latents(lora, tok, PROMPTS, **kw)
    merged = generate_with_latents(lora.merge_and_unload(), tok, PROMPTS, **kw)
    assert got.token_ids == merged.token_ids
    torch.testing.assert_close(got.latents, merged.latents, rtol=1e-4, atol=1e-4)


def test_unspliceable_cache_falls_back_to_one_padded_prefill():
    """A sliding-window model's cache is not spliced across buckets; results still match."""
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=48,
                                             sliding_window=8, max_position_embeddings=128)).eval()
    model.generation_config.eos_token_id = 2
    tok = Tok()
    got = generate_with_latents(model, tok, PROMPTS, num_latents=2, start_token="<s>", end_token="<e>",
                                max_new_tokens=6)
    assert got.token_ids == _previous_generate(model, tok, PROMPTS, 2, 6)
    assert model_device(model).type == "cpu"


@pytest.mark.parametrize("lengths,buckets,expected", [
    ([5, 5, 5, 5], 4, [[0, 1, 2, 3]]),                       # nothing to save
    ([100, 3, 4, 98, 5, 99], 4, [[1, 2, 4], [0, 3, 5]]),     # two clusters: two buckets suffice
    ([10, 200], 1, [[0, 1]]),
    ([7], 4, [[0]]),
])
def test_length_buckets(lengths, buckets, expected):
    assert length_buckets(lengths, buckets) == expected


def test_length_buckets_cover_every_row_once_and_minimise_padding():
    import random

    lengths = [random.Random(i).randint(20, 300) for i in range(64)]
    groups = length_buckets(lengths, 4)
    assert sorted(r for g in groups for r in g) == list(range(64)) and len(groups) <= 4
    padded = sum(len(g) * max(lengths[r] for r in g) for g in groups)
    assert padded < 0.75 * 64 * max(lengths)
