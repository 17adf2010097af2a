"""SIM-CoT: step alignment, padding, one decoder forward per step on every batch, decoder kinds,
dropping the decoder for inference, and reading latents as text.

Each of the reference bugs listed in docs METHODS.md is pinned here:
  1 batch step targets truncated to the first row's length  → test_rows_keep_all_their_step_tokens
  2 decoder skipped when a batch has no target              → test_decoder_runs_once_even_without_targets
  3 one decoder forward per latent in a Python loop         → test_decoder_runs_once_even_without_targets
  4 step boundaries from hard-coded token ids               → test_step_targets_are_tokenized_step_texts
  5 Coconut variant never trains the decoder                → test_methods_learning.py
"""
import pytest
import torch
from conftest import make_cfg

from pipeline.data import Example
from pipeline.interpret import explain_latents
from pipeline.methods import StepContext, simcot, step_decoder
from pipeline.methods.step_decoder import ADAPTER_NAME, align_steps, encode_targets


def ex(steps, question="Tom has 3 apples and buys 4 more. How many?", answer="7"):
    return Example(question=question, steps=tuple(steps), answer=answer, source_id="inline")


def test_align_latent_k_with_step_k_merge_tail_and_mask_extra():
    assert align_steps(["a", "b", "c"], 3) == ["a", "b", "c"]
    assert align_steps(["a", "b", "c", "d", "e"], 3) == ["a", "b", "c d e"]       # tail merged into the last
    assert align_steps(["a"], 3) == ["a", None, None]                             # extra latents: no target
    assert align_steps([], 2) == [None, None]
    assert align_steps(["a", "b"], 0) == []
    # Coconut's c latents per step: latents 2k, 2k+1 <-> step k.
    assert align_steps(["a", "b"], 4, latents_per_step=2) == ["a", "a", "b", "b"]
    assert align_steps(["a", "b", "c"], 4, latents_per_step=2) == ["a", "a", "b c", "b c"]
    # extra latents repeat the last step: the final latent always carries the last calculation
    assert align_steps(["a", "b"], 4, repeat_last=True) == ["a", "b", "b", "b"]
    assert align_steps(["a"], 4, latents_per_step=2, repeat_last=True) == ["a", "a", "a", "a"]
    assert align_steps(["a", "b", "c"], 2, repeat_last=True) == ["a", "b c"]


def test_extra_latents_repeat_last_gives_every_latent_a_target(build, tokenizer):
    built = build(make_cfg("simcot", simcot__decoder="full", simcot__extra_latents="repeat_last"))
    batch = built.collate([ex(["<<3+4=7>>"]), ex(["<<2*3=6>>", "<<6+1=7>>"], answer="7")], 0)
    assert batch["step_has_target"].tolist() == [[1, 1, 1], [1, 1, 1]]
    last = batch["step_mask"][1, 2].bool()
    assert tokenizer.decode(batch["step_ids"][1, 2][last].tolist()) == "<<6+1=7>>" + tokenizer.eos_token


def test_rows_keep_all_their_step_tokens(tokenizer):
    """Bug 1: the first row's short steps must not truncate the second row's long ones."""
    targets = [["<<1+1=2>>", None], ["<<1234*5678=7006652>>", "<<7006652-1=7006651>>"]]
    out = encode_targets(targets, tokenizer, max_tokens=64)
    eos = tokenizer.eos_token
    assert out["step_ids"].shape[:2] == (2, 2)
    assert out["step_has_target"].tolist() == [[1, 0], [1, 1]]
    for i, row in enumerate(targets):
        for k, text in enumerate(row):
            if text is None:
                assert out["step_mask"][i, k].sum() == 0
                continue
            ids = out["step_ids"][i, k][out["step_mask"][i, k].bool()].tolist()
            assert tokenizer.decode(ids) == text + eos


def test_step_targets_are_tokenized_step_texts(build, tokenizer):
    """Bug 4: steps come from the examples' text, each step tokenized, for whatever tokenizer."""
    built = build(make_cfg("simcot", simcot__decoder="full"))
    examples = [ex(["<<3+4=7>>"]), ex(["<<2*3=6>>", "<<6+1=7>>", "<<7-2=5>>", "<<5*2=10>>"], answer="10")]
    batch = built.collate(examples, 0)
    n = built.cfg.method.num_latents                    # 3 latents
    assert batch["step_ids"].shape[:2] == (2, n)
    expected = [align_steps(e.steps, n) for e in examples]
    assert expected[1] == ["<<2*3=6>>", "<<6+1=7>>", "<<7-2=5>> <<5*2=10>>"]
    for i in range(2):
        for k in range(n):
            mask = batch["step_mask"][i, k].bool()
            text = tokenizer.decode(batch["step_ids"][i, k][mask].tolist())
            assert text == ("" if expected[i][k] is None else expected[i][k] + tokenizer.eos_token)


@pytest.mark.parametrize("base", ["codi", "coconut"])
def test_latent_k_is_paired_with_step_k_in_the_decoder_input(build, gsm_examples, base):
    built = build(make_cfg("simcot", simcot__decoder="full", simcot__base=base))
    stage = 3
    examples = gsm_examples[2:6]
    batch = built.collate(examples, stage)
    seen = {}
    handle = built.parts["decoder"].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        out = simcot.run(built.parts, batch, built.cfg, StepContext(stage=stage))
    finally:
        handle.remove()
    bsz, n, _ = out.latents.shape
    embeds = seen["inputs_embeds"]                                   # [M, 1 + L, d]: pairs with a target
    pairs = [(i, k) for i in range(bsz) for k in range(batch["step_has_target"].shape[1])
             if batch["step_has_target"][i, k]]
    assert 0 < len(pairs) < bsz * n and embeds.shape[0] == len(pairs)
    width = embeds.shape[1] - 1
    table = built.parts["decoder"].get_input_embeddings()
    for r, (i, k) in enumerate(pairs):
        torch.testing.assert_close(embeds[r, 0], out.latents[i, k])              # latent k of row i ...
        mask = batch["step_mask"][i, k].bool()
        assert not batch["step_mask"][i, k, width:].any()                       # packed width cuts no token
        torch.testing.assert_close(embeds[r, 1:][mask[:width]], table(batch["step_ids"][i, k][mask]))  # ... step k
        assert seen["attention_mask"][r, 1:].tolist() == batch["step_mask"][i, k, :width].tolist()


@pytest.mark.parametrize("base,stage", [("codi", 0), ("coconut", 2), ("coconut", 0)])
def test_decoder_runs_once_even_without_targets(build, gsm_examples, base, stage):
    """Bugs 2 and 3: one decoder forward per training step, [M, 1+L] over the M (row, latent) pairs
    with a target, also when no row has a step target (then one padding row: its loss is exactly 0
    and the decoder still gets (zero) gradients)."""
    built = build(make_cfg("simcot", simcot__decoder="full", simcot__base=base))
    shapes = []
    handle = built.parts["decoder"].register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        for examples in (gsm_examples[:3], [ex([]), ex([], answer="8")]):
            shapes.clear()
            built.parts.zero_grad(set_to_none=True)
            batch = built.collate(examples, stage)
            loss, logs = simcot.compute_loss(built.parts, batch, built.cfg, StepContext(stage=stage))
            loss.backward()
            assert len(shapes) == 1
            has_targets = bool(batch["step_has_target"].any())
            if has_targets:       # the pairs with a target, as wide as the longest of them
                assert shapes[0] == (int(batch["step_has_target"].sum()), 1 + int(batch["step_mask"].sum(-1).max()))
            else:
                assert shapes[0] == (1, 2)
            assert (logs["step_decoder"] > 0) == has_targets
            grads = [p.grad for p in built.parts["decoder"].parameters()]
            assert all(g is not None for g in grads)           # in the graph on every rank
            if not has_targets:
                assert all(g.abs().sum() == 0 for g in grads)
    finally:
        handle.remove()


def test_shared_decoder_adds_only_adapter_parameters(build, tokenizer):
    cfg = make_cfg("codi")
    plain = sum(p.numel() for p in build(cfg).parts.parameters())
    built = build(make_cfg("simcot", simcot__decoder="shared", simcot__decoder_lora_r=2))
    names = [n for n, _ in built.parts.named_parameters()]
    added = [n for n in names if f".{ADAPTER_NAME}" in n]
    assert added and all("lora_" in n for n in added)
    assert sum(p.numel() for p in built.parts.parameters()) - plain == sum(
        p.numel() for n, p in built.parts.named_parameters() if n in added)


@pytest.mark.parametrize("kind", ["full", "shared", "separate", "main"])
def test_decoder_is_dropped_for_inference(build, gsm_examples, kind):
    built = build(make_cfg("simcot", simcot__decoder=kind, simcot__decoder_model="tiny-llama"))
    batch = built.collate(gsm_examples[:2], 0)
    with torch.no_grad():
        before = simcot.run(built.parts, batch, built.cfg, StepContext()).logs
    kept = simcot.inference_parts(built.parts)
    assert set(kept) == {"lm", "projection"}
    assert not any(ADAPTER_NAME in n for n, _ in kept.named_parameters())
    from pipeline.methods import codi
    with torch.no_grad():        # the base method is untouched by removing the decoder
        after = codi.run(kept, batch, built.cfg, StepContext()).logs
    for key in after:
        torch.testing.assert_close(after[key], before[key])


@pytest.mark.parametrize("kind,base", [("full", "codi"), ("shared", "codi"), ("separate", "codi"),
                                       ("shared", "coconut"), ("main", "codi")])
def test_interpret_latents_as_text_and_tokens(build, kind, base):
    built = build(make_cfg("simcot", simcot__decoder=kind, simcot__decoder_model="tiny-llama", simcot__base=base))
    questions = ["Tom has 3 apples and buys 4 more. How many?", "What is 2 times 6?"]
    rows = explain_latents(built.loaded, built.parts, built.cfg, questions, top_k=3, max_new_tokens=5)
    n = built.cfg.method.num_latents if base == "codi" else 3 * 1
    assert len(rows) == 2 and all(len(r) == n for r in rows)
    for row in rows:
        for item in row:
            assert isinstance(item.step_text, str)
            assert len(item.top_tokens) == 3
            probs = [p for _, p in item.top_tokens]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # Batch invariant too: the second question alone reads the same.
    alone = explain_latents(built.loaded, built.parts, built.cfg, questions[1:], top_k=3, max_new_tokens=5)
    assert [x.step_text for x in alone[0]] == [x.step_text for x in rows[1]]
    assert [t for t, _ in alone[0][0].top_tokens] == [t for t, _ in rows[1][0].top_tokens]
    assert built.parts.training                                   # mode restored


def test_interpret_without_decoder_gives_tokens_only(build):
    built = build(make_cfg("codi"))
    rows = explain_latents(built.loaded, built.parts, built.cfg, ["What is 2 times 6?"], top_k=2)
    assert all(item.step_text is None and len(item.top_tokens) == 2 for item in rows[0])


@pytest.mark.parametrize("kind", ["full", "shared", "separate", "main"])
def test_explain_gradient_flows_through_latents_into_projection_and_lora(build, gsm_examples, kind):
    """With every base loss weighted 0, the explain loss alone still trains the projection and the
    main LoRA adapter: decoder → latent → projection → LoRA."""
    cfg = make_cfg("simcot", simcot__decoder=kind, simcot__decoder_model="tiny-llama")
    cfg.method.codi.alpha = cfg.method.codi.beta = cfg.method.codi.gamma = 0.0
    built = build(cfg)
    loss, logs = simcot.compute_loss(built.parts, built.collate(gsm_examples[:3], 0), cfg, StepContext())
    loss.backward()
    assert logs["step_decoder"] > 0
    assert all(p.grad.abs().sum() > 0 for p in built.parts["projection"].parameters())
    main_lora = [p for n, p in built.parts["lm"].named_parameters() if "lora_B.default" in n]
    assert main_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in main_lora)


def test_main_decoder_adds_no_parameter_and_is_the_main_model(build, gsm_examples):
    """decoder=main: the step decoder is parts["lm"] itself: no parameter added, and its explain loss
    equals the main model's own CE on [latent ; step tokens]."""
    from pipeline.losses import IGNORE_INDEX, causal_lm_ce
    from pipeline.methods import step_decoder

    plain = build(make_cfg("codi", lora=False))
    built = build(make_cfg("simcot", lora=False, simcot__decoder="main"))
    assert sum(p.numel() for p in built.parts.parameters()) == sum(p.numel() for p in plain.parts.parameters())
    batch = built.collate(gsm_examples[:2], 0)
    latents = torch.randn(2, built.cfg.method.num_latents, 32)
    loss, _ = step_decoder.explain_loss(built.parts, built.cfg, latents, batch)
    lm, ids, mask, has = built.parts["lm"], batch["step_ids"], batch["step_mask"], batch["step_has_target"]
    per = []
    for b in range(2):
        for k in range(latents.shape[1]):
            if not has[b, k]:
                continue
            n = int(mask[b, k].sum())
            x = torch.cat([latents[b, k][None], lm.get_input_embeddings()(ids[b, k, :n])])[None]
            labels = torch.cat([torch.tensor([IGNORE_INDEX]), ids[b, k, :n]])[None]
            per.append(causal_lm_ce(lm(inputs_embeds=x).logits, labels))
    torch.testing.assert_close(loss, torch.stack(per).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,base,stage", [("full", "codi", 0), ("shared", "codi", 0), ("separate", "codi", 0),
                                             ("full", "coconut", 3), ("shared", "coconut", 2)])
def test_packed_decoder_equals_all_pairs(build, gsm_examples, kind, base, stage):
    """Issue 12.2: the decoder reads only the pairs with a target (padded to the count agreed across
    ranks) — same explain loss, per-row values and gradients as running all B·n pairs, also when
    another rank has more pairs (agree_max above the local count adds zero-weight rows)."""
    built = build(make_cfg("simcot", simcot__decoder=kind, simcot__decoder_model="tiny-llama", simcot__base=base))
    batch = built.collate(gsm_examples, stage)
    assert 0 < batch["step_has_target"].sum() < batch["step_has_target"].numel()
    latents = torch.randn(len(gsm_examples), batch["step_has_target"].shape[1], 32,
                          generator=torch.Generator().manual_seed(0))
    results = []
    for packed, agree_max in ((False, int), (True, int), (True, lambda m: m + 5)):
        built.parts.zero_grad(set_to_none=True)
        z = latents.clone().requires_grad_(True)
        loss, per_row = step_decoder.explain_loss(built.parts, built.cfg, z, batch, agree_max=agree_max, packed=packed)
        loss.backward()
        grads = [p.grad.clone() for p in built.parts.parameters() if p.grad is not None]
        results.append((loss.detach(), per_row, z.grad, grads))
    reference = results[0]
    for loss, per_row, latent_grad, grads in results[1:]:
        torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(per_row, reference[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(latent_grad, reference[2], rtol=1e-5, atol=1e-8)
        assert len(grads) == len(reference[3]) > 0
        for got, want in zip(grads, reference[3]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
