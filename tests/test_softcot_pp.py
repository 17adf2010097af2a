"""SoftCoT++ training on a tiny assistant/base pair with different tokenizers and hidden sizes:
the contrastive loss against a hand computation, initial-token rows per tokenizer, one batched
forward per model, gradients into the initial tokens through the frozen assistant, batch
invariance, fp32 master weights, and export → evaluation adapter equal to training."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.methods import StepContext, softcot
from pipeline.methods.softcot_sets import contrastive_loss, info_nce, initial_token_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from softcot_models import model_pair  # noqa: E402

GSM = ROOT / "tests" / "fixtures" / "gsm8k_train.jsonl"
N, S = 3, 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return model_pair(tmp_path_factory.mktemp("softcot_pair"))


def pp_overrides(pair, sets: int = S) -> list[str]:
    base, assistant = pair
    return [f"model.name_or_path={base}", "method.name=softcot", f"method.softcot.assistant_model={assistant}",
            f"method.softcot.num_thoughts={N}", f"method.softcot.num_thought_sets={sets}",
            "data.train.0.format=gsm8k", f"data.train.0.path={GSM}"]


@pytest.fixture(scope="module")
def built(pair):
    from pipeline.data import read_gsm8k
    from pipeline.models import load_model, load_tokenizer

    cfg = load_config(None, pp_overrides(pair))
    torch.manual_seed(0)
    loaded = load_model(cfg.model, load_tokenizer(cfg.model))
    parts = softcot.build_parts(cfg, loaded)
    collate = softcot.make_collate(cfg, loaded, parts)
    return SimpleNamespace(cfg=cfg, loaded=loaded, parts=parts, collate=collate,
                           examples=read_gsm8k(GSM).examples[:4])


# --------------------------------------------------------------------------- the contrastive loss

def test_info_nce_equals_a_hand_computation():
    # One question, 3 sets in 2-D; positives rotated a little from their anchors.
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    positives = torch.tensor([[[2.0, 0.2], [0.1, 1.0], [1.0, 0.8]]])
    t = 0.05

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.hypot(*u) / math.hypot(*v)

    expected = 0.0
    for s in range(3):
        logits = [cos(anchors[0, s].tolist(), positives[0, j].tolist()) / t for j in range(3)]
        expected += -(logits[s] - math.log(sum(math.exp(x) for x in logits)))
    torch.testing.assert_close(info_nce(anchors, positives, t), torch.tensor(expected / 3))
    # A second question is averaged in, never mixed in as a negative.
    two = info_nce(torch.cat([anchors, anchors.flip(1)]), torch.cat([positives, positives.flip(1)]), t)
    torch.testing.assert_close(two, torch.tensor(expected / 3))


def test_contrastive_positive_is_a_dropout_view_of_the_set_itself():
    thoughts = torch.randn(2 * S, N, 5)                         # rows b·S + s
    blocks = thoughts.reshape(2, S, N * 5)
    torch.manual_seed(7)
    got = contrastive_loss(thoughts, S, 0.05, 0.5, training=True)
    torch.manual_seed(7)
    torch.testing.assert_close(got, info_nce(blocks, F.dropout(blocks, 0.5, training=True), 0.05))
    torch.testing.assert_close(contrastive_loss(thoughts, S, 0.05, 0.5, training=False), info_nce(blocks, blocks, 0.05))


# --------------------------------------------------------------------------- initial tokens

def test_initial_token_rows_per_tokenizer(built, pair):
    from transformers import AutoTokenizer

    a_tok = softcot.assistant_tokenizer(built.cfg, built.loaded.tokenizer)
    rows, names = initial_token_rows(a_tok, S)
    assert names == [f"<|reserved_special_token_{i}|>" for i in range(S)]
    assistant_rows = built.parts["assistant"].get_input_embeddings().weight[rows]
    assert torch.equal(built.parts["initial_tokens"].weight, assistant_rows.float())
    assert built.parts["initial_tokens"].weight.requires_grad and built.parts["initial_tokens"].weight.dtype == torch.float32
    qwen = SimpleNamespace(get_vocab=lambda: {"a": 0, "<|box_start|>": 7, "<|vision_pad|>": 9, "<|im_end|>": 3},
                           chat_template="<|im_start|>{{ m }}<|im_end|>", all_special_tokens=["<|im_end|>"])
    assert initial_token_rows(qwen, 2) == ([7, 9], ["<|box_start|>", "<|vision_pad|>"])
    assert initial_token_rows(a_tok, 2, ["H", "o"])[1] == ["H", "o"]
    chatml = AutoTokenizer.from_pretrained(str(pair[0]))            # ChatML base: no reserved rows
    with pytest.raises(ValueError, match=r"num_thought_sets=3: .* has 0 .* method.softcot.initial_tokens"):
        initial_token_rows(chatml, S)
    with pytest.raises(ValueError, match="not single tokens"):
        initial_token_rows(a_tok, 1, ["<|no such token|>"])
    with pytest.raises(Exception, match="method.softcot.initial_tokens"):
        load_config(None, ["method.softcot.num_thought_sets=2", "method.softcot.initial_tokens=[a]"])


# --------------------------------------------------------------------------- the loss step

def test_one_batched_forward_per_model_over_every_set(built):
    parts, calls = built.parts, {"assistant": [], "lm": []}
    hooks = [parts[name].register_forward_pre_hook(
        lambda m, a, kw, name=name: calls[name].append(kw["inputs_embeds"]), with_kwargs=True)
        for name in calls]
    batch = built.collate(built.examples)
    try:
        out = softcot.run(parts, batch, built.cfg, StepContext())
    finally:
        for h in hooks:
            h.remove()
    b = len(built.examples)
    assert [len(v) for v in calls.values()] == [1, 1]
    assert calls["assistant"][0].shape[0] == calls["lm"][0].shape[0] == b * S
    # Row b·S + s: the assistant's placeholder slots hold initial token s; the base's hold its thoughts.
    table = parts["initial_tokens"].weight
    for row in range(b * S):
        assert torch.equal(calls["assistant"][0][row, -N:], table[row % S].expand(N, -1))
    slots = batch["thought_slots"].repeat_interleave(S, 0)
    torch.testing.assert_close(calls["lm"][0][:, :slots.shape[1]][slots], out.latents.reshape(-1, out.latents.shape[-1]))
    sets = out.latents.reshape(b, S, N, -1)
    assert not torch.allclose(sets[:, 0], sets[:, 1])                 # different initial tokens, different thoughts
    assert set(out.logs) == {"ce", "contrastive"}
    torch.testing.assert_close(out.loss, S * out.logs["ce"] + out.logs["contrastive"] / S)


def test_initial_tokens_and_projection_get_gradients_through_frozen_models(built):
    parts = built.parts
    parts.zero_grad(set_to_none=True)
    loss, _ = softcot.compute_loss(parts, built.collate(built.examples), built.cfg, StepContext())
    loss.backward()
    grad = parts["initial_tokens"].weight.grad
    assert grad is not None and (grad.abs().sum(1) > 0).all()          # every set's token trains
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts["projection"].parameters())
    for name in ("assistant", "lm"):
        assert all(p.grad is None and not p.requires_grad for p in parts[name].parameters()), name
    parts.zero_grad(set_to_none=True)


def test_per_row_loss_is_batch_invariant_with_several_sets(built):
    parts = built.parts.eval()
    with torch.no_grad():
        big = softcot.run(parts, built.collate(built.examples), built.cfg, StepContext()).per_row["ce"]
        one = torch.cat([softcot.run(parts, built.collate([e]), built.cfg, StepContext()).per_row["ce"]
                         for e in built.examples])
    parts.train()
    torch.testing.assert_close(big, one, rtol=1e-5, atol=1e-5)


def test_bf16_keeps_fp32_master_weights_of_projection_and_initial_tokens(pair, tmp_path):
    from pipeline.train import run

    captured = {}
    cfg = load_config(None, [*pp_overrides(pair), f"train.output_dir={tmp_path}", "model.dtype=bf16",
                             "train.max_steps=1", "train.export=false", "train.per_device_train_batch_size=2",
                             "data.train.0.max_examples=2", "train.save_steps=null"])
    run(cfg, on_end=lambda strategy, tokenizer: captured.update(engine=strategy.engine))
    engine = captured["engine"]
    trained = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    assert sorted(trained) == ["parts.initial_tokens.weight", "parts.projection.bias", "parts.projection.weight"]
    assert {p.dtype for p in trained.values()} == {torch.bfloat16}
    masters = [p for group in engine.optimizer.optimizer.param_groups for p in group["params"]]
    assert {p.dtype for p in masters} == {torch.float32}
    assert sum(p.numel() for p in masters) == sum(p.numel() for p in trained.values())


# --------------------------------------------------------------------------- export → evaluation

def test_export_carries_the_trained_initial_tokens_into_the_adapter(built, tmp_path):
    from evaluation.adapters import DecodeConfig
    from evaluation.softcot import SoftCoTAdapter
    from pipeline.export import export_parts
    from pipeline.latent import left_pad

    parts = built.parts.eval()
    with torch.no_grad():
        parts["initial_tokens"].weight.add_(0.1)                     # "trained": no longer the assistant's rows
    tok = built.loaded.tokenizer
    out = export_parts(copy.deepcopy(parts), built.cfg, tok, tmp_path / "export")
    adapter = SoftCoTAdapter.from_exported(out, decode=DecodeConfig(max_new_tokens=4, do_sample=False))
    assert adapter.method == "softcot++" and len(adapter.sets) == S
    torch.testing.assert_close(torch.stack(adapter.sets), parts["initial_tokens"].weight)
    qs = [e.question for e in built.examples]
    batch = built.collate(built.examples)
    prompt_ids, _ = left_pad([tok(adapter.base_prompt(q, N)).input_ids for q in qs], tok.pad_token_id)
    assert torch.equal(prompt_ids, batch["prompt_ids"])                # same instruction, template, thoughts
    with torch.no_grad():
        train = softcot.run(parts, batch, built.cfg, StepContext()).latents.reshape(len(qs), S, N, -1)
        for s in range(S):
            torch.testing.assert_close(adapter.thoughts(qs, adapter.sets[s], N), train[:, s])
    parts.train()


def test_planner_counts_the_thought_sets():
    from pipeline.plan import make_plan

    recipe = str(ROOT / "recipes" / "configs" / "llama8b_softcot.yaml")
    one = make_plan(load_config(recipe), recipe)
    ten = make_plan(load_config(recipe, ["method.softcot.num_thought_sets=10"]), recipe)
    assert ten.activations["rollout"] == pytest.approx(10 * one.activations["rollout"])
    assert ten.activations["logits"] == pytest.approx(10 * one.activations["logits"])
    # The initial tokens train through the assistant: all 16 of its layers' activations, 10 times.
    assert ten.activations["assistant"] == pytest.approx(10 * 16 * one.activations["assistant"])
    assert ten.params["projection"][1] - one.params["projection"][1] == 10 * 2048       # S x d_assistant
    assert "10 thought sets" in ten.method_line and "x 10 thought sets" in ten.activation_note
