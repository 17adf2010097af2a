"""SoftCoT: only the projection trains (directly and through the engine), one assistant forward per
step, batch invariance, learning, and export → `SoftCoTAdapter.from_exported` equal to the live parts."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_cfg

from evaluation.adapters import DecodeConfig
from evaluation.softcot import SoftCoTAdapter
from pipeline.latent import SOFTCOT_BEGIN, SOFTCOT_END, SOFTCOT_PLACEHOLDER, left_pad
from pipeline.methods import StepContext, softcot

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from train_variants import TINY_OVERRIDES  # noqa: E402

N = 3


def softcot_cfg(lora: bool = False, assistant: str = "tiny-llama"):
    return make_cfg("softcot", lora=lora, softcot__num_thoughts=N, softcot__assistant_model=assistant,
                    softcot__target="annotations")      # the GSM8k-Aug fixture has no natural-language lines


@pytest.mark.parametrize("lora,assistant", [(False, "tiny-llama"), (True, "tiny-gpt2")])
def test_gradients_reach_only_the_trainable_parts(build, gsm_examples, lora, assistant):
    built = build(softcot_cfg(lora, assistant), live_lora=lora)
    loss, logs = softcot.compute_loss(built.parts, built.collate(gsm_examples[:4]), built.cfg, StepContext())
    loss.backward()
    assert set(logs) == {"ce"} and torch.isfinite(loss)
    assert all(p.grad is None and not p.requires_grad for p in built.parts["assistant"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in built.parts["projection"].parameters())
    for name, p in built.parts["lm"].named_parameters():
        assert p.requires_grad == (lora and ("lora_" in name or "trainable_tokens" in name)), name
        assert (p.grad is not None) == p.requires_grad, name


def test_assistant_runs_once_per_step_and_thoughts_fill_the_placeholders(build, gsm_examples):
    built = build(softcot_cfg(), live_lora=False)
    calls, seen = [], []
    h1 = built.parts["assistant"].register_forward_hook(lambda *a: calls.append(1))
    h2 = built.parts["lm"].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"]),
                                                     with_kwargs=True)
    batch = built.collate(gsm_examples[:4])
    try:
        out = softcot.run(built.parts, batch, built.cfg, StepContext())
    finally:
        h1.remove()
        h2.remove()
    assert len(calls) == 1 and len(seen) == 1
    assert out.latents.shape == (4, N, built.loaded.hidden_size)
    tok = built.loaded.tokenizer
    slots = batch["thought_slots"]
    assert slots.sum(1).tolist() == [N] * 4
    torch.testing.assert_close(seen[0][:, :slots.shape[1]][slots], out.latents.reshape(-1, out.latents.shape[-1]))
    begin = (batch["prompt_ids"] == tok.convert_tokens_to_ids(SOFTCOT_BEGIN)).int().argmax(-1)
    end = (batch["prompt_ids"] == tok.convert_tokens_to_ids(SOFTCOT_END)).int().argmax(-1)
    assert (end - begin).tolist() == [N + 1] * 4                       # begin · N thoughts · end
    assert (batch["assistant_ids"][:, -N:] == tok.convert_tokens_to_ids(SOFTCOT_PLACEHOLDER)).all()


def test_per_row_loss_is_batch_invariant(build, gsm_examples):
    built = build(softcot_cfg(lora=True), live_lora=True)
    built.parts.eval()
    examples = gsm_examples[:6]
    with torch.no_grad():
        big = softcot.run(built.parts, built.collate(examples), built.cfg, StepContext()).per_row["ce"]
        one = torch.cat([softcot.run(built.parts, built.collate([e]), built.cfg, StepContext()).per_row["ce"]
                         for e in examples])
    torch.testing.assert_close(big, one, rtol=1e-5, atol=1e-5)


def test_loss_falls_training_only_the_projection(build, gsm_examples):
    built = build(softcot_cfg(), live_lora=False)
    # A tiny random base at init std 0.02 gives near-uniform logits whatever its input; sharper
    # random weights make it read its (soft) prompt, so the projection has something to learn.
    with torch.no_grad():
        for name, p in built.parts["lm"].named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    batch = built.collate(gsm_examples[:4])
    opt = torch.optim.Adam(built.parts["projection"].parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss, _ = softcot.compute_loss(built.parts, batch, built.cfg, StepContext())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses


# --------------------------------------------------------------------------- through the engine + export

@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """Two optimizer steps of pipeline.train.run (single process, DeepSpeed ZeRO-0) with export."""
    from pipeline.config import load_config
    from pipeline.train import run

    out = tmp_path_factory.mktemp("softcot_run")
    captured = {}

    def on_end(strategy, tokenizer):
        captured["parts"] = copy.deepcopy(strategy.engine.module.parts).eval()
        captured["tokenizer"] = tokenizer

    cfg = load_config(None, [*TINY_OVERRIDES, f"train.output_dir={out}", "method.name=softcot",
                             f"method.softcot.num_thoughts={N}", "method.softcot.eval_num_thoughts=2", "method.softcot.target=annotations",
                             "train.max_steps=2", "train.export=true", "train.projection_learning_rate=1e-2"])
    result = run(cfg, on_end=on_end)
    return cfg, out, result, captured


def test_engine_step_changes_only_the_projection(engine_run):
    from pipeline.train import build_module

    cfg, out, result, captured = engine_run
    assert result["step"] == 2
    record = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert "lr/projection" in record and "lr/main" not in record
    fresh, _, _ = build_module(cfg, captured["tokenizer"])
    live = captured["parts"].state_dict()
    for name, value in fresh.parts.state_dict().items():
        if name.startswith("projection."):
            assert not torch.equal(value, live[name]), name          # trained
        else:
            assert torch.equal(value, live[name]), name              # frozen: bit-identical


def test_export_loads_in_the_softcot_adapter_like_the_live_parts(engine_run, gsm_examples):
    from pipeline.export import load_exported

    cfg, out, _, captured = engine_run
    export = out / "export"
    meta = json.loads((export / "latent_meta.json").read_text())
    assert meta["method"] == "softcot" and meta["num_thoughts"] == 2 and meta["train_num_thoughts"] == N
    assert meta["assistant_model"] == "tiny-llama" and meta["projection"]["kind"] == "linear"
    assert (export / "assistant" / "config.json").is_file() and (export / "assistant" / "tokenizer.json").is_file()
    ex = load_exported(export)
    assert ex.assistant is not None and isinstance(ex.projection, torch.nn.Linear)

    parts, tok = captured["parts"], captured["tokenizer"]
    decode = DecodeConfig(max_new_tokens=5, do_sample=False)
    exported = SoftCoTAdapter.from_exported(export, decode=decode)
    assert exported.default_num_latents == 2 and (exported.begin, exported.end) == (SOFTCOT_BEGIN, SOFTCOT_END)
    live = SoftCoTAdapter(parts["assistant"], tok, parts["lm"], tok, parts["projection"], num_thoughts=N,
                          assistant_placeholder=SOFTCOT_PLACEHOLDER, base_placeholder=SOFTCOT_PLACEHOLDER,
                          begin=SOFTCOT_BEGIN, end=SOFTCOT_END, decode=decode)
    qs = [e.question for e in gsm_examples[:4]]
    # The training batch uses the adapter's prompts and thoughts exactly.
    batch = softcot.make_collate(cfg, SimpleNamespace(tokenizer=tok), parts)(gsm_examples[:4])
    prompt_ids, _ = left_pad([tok(live.base_prompt(q, N)).input_ids for q in qs], tok.pad_token_id)
    assert torch.equal(prompt_ids, batch["prompt_ids"])
    with torch.no_grad():
        train_thoughts = softcot.run(parts, batch, cfg, StepContext()).latents
        torch.testing.assert_close(live.thoughts(qs, "", N), train_thoughts)
        torch.testing.assert_close(exported.thoughts(qs, "", N), train_thoughts)
        ids = torch.tensor([[5, 17, 42, 99, 500, 3, 250, 11]])
        torch.testing.assert_close(exported.base(input_ids=ids).logits, parts["lm"](input_ids=ids).logits)
    instances = [SimpleNamespace(question=q, id=str(i)) for i, q in enumerate(qs)]
    exported.default_num_latents = N
    assert [g.text for g in exported.generate(instances, seed=41)] == [g.text for g in live.generate(instances, 41)]


def test_cli_evaluates_a_softcot_export(engine_run, tmp_path):
    from evaluation.cli import main

    _, out, _, _ = engine_run
    aug = ROOT / "tests" / "fixtures" / "gsm8k_aug_test.txt"
    assert main(["run", "--adapter", "softcot", "--model", str(out / "export"), "--benchmarks", f"gsm8k_aug={aug}",
                 "--limit", "3", "--max-new-tokens", "3", "--seeds", "41", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["results"][0]["benchmark"] == "gsm8k_aug"
    assert '"num_thoughts": 2' in (tmp_path / "r" / "results.json").read_text()
