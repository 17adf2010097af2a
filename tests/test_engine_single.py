"""The engine in one process (DeepSpeed at world size 1, gloo): outputs of a run, accumulation
invariance, offload, LoRA export as adapter, SIGTERM, optimizer reset. Each run takes 1-5 s."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from launch_env import child_env  # noqa: E402
from train_variants import LORA, PROBE_IDS, TINY_OVERRIDES  # noqa: E402

from pipeline.config import load_config  # noqa: E402


def train(tmp: Path, *overrides: str, logits: bool = False):
    """run() in this process; returns (result, live logits of parts["lm"] or None)."""
    from pipeline.train import run

    captured = {}

    def on_end(strategy, tokenizer):
        with torch.no_grad():
            captured["logits"] = strategy.engine.module.parts["lm"](input_ids=PROBE_IDS).logits.float()

    cfg = load_config(None, [*TINY_OVERRIDES, f"train.output_dir={tmp}", *overrides])
    return run(cfg, on_end=on_end if logits else None), captured.get("logits")


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_run_writes_config_log_checkpoint_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.export import export_from_checkpoint, load_exported

    out = tmp_path / "run"
    result, live = train(out, "method.name=codi", "train.export=true", "train.report_to=[tensorboard]",
                         "train.max_steps=2", logits=True)
    assert result["step"] == 2 and result["world_size"] == 1 and result["zero_stage"] == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["name"] == "codi"
    record = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    for key in ("step", "epoch", "loss", "loss/ce_student", "loss/distill", "loss/ce_teacher", "lr/main",
                "lr/projection", "tokens_per_s", "samples_per_s", "memory_mb"):
        assert key in record, key
    assert json.loads((out / "metrics.json").read_text())["final_loss"] == pytest.approx(record["loss"])
    assert list((out / "tensorboard").glob("events.*"))
    assert (out / "checkpoints" / "latest").read_text() == "step_2"
    plain = AutoModelForCausalLM.from_pretrained(str(out / "export")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=PROBE_IDS).logits, live, atol=1e-5, rtol=1e-5)
    meta = json.loads((out / "export" / "latent_meta.json").read_text())
    assert meta["method"] == "codi" and meta["num_latents"] == 2 and meta["start_token"] == "<bot>"
    # Offline export from the ZeRO-0 checkpoint gives the same model and projection.
    offline = load_exported(export_from_checkpoint(out / "checkpoints" / "step_2", tmp_path / "offline"))
    online = load_exported(out / "export")
    with torch.no_grad():
        torch.testing.assert_close(offline.model(input_ids=PROBE_IDS).logits, live, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 32)
    torch.testing.assert_close(offline.projection(x), online.projection(x))


@pytest.mark.parametrize("method", ["cot", "simcot"])
def test_accumulation_equals_larger_batch(tmp_path, method):
    """batch 8 x accumulation 1 vs batch 4 x accumulation 2 on the same examples per step, through
    the training loop: every loss part is normalised by its count over the whole optimizer step
    (issue 10.3), so the logged losses (and so the updates) agree to float precision."""
    chosen = [f"method.name={method}", *(LORA if method == "simcot" else [])]     # SIM-CoT: shared decoder
    train(tmp_path / "a", *chosen, "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1")
    train(tmp_path / "b", *chosen, "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=2")
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    # Logged parts are per-target means of the whole step: with unit weights they add up to the loss.
    for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["loss"] == pytest.approx(sum(v for k, v in record.items() if k.startswith("loss/")), rel=1e-5)


def test_zero3_offload_matches_zero0(tmp_path):
    """Parameter + optimizer offload with our torch AdamW (no DeepSpeed CPU-Adam build)."""
    common = ["train.per_device_train_batch_size=8", "deepspeed.enabled=true", "train.max_steps=2"]
    train(tmp_path / "z0", *common, "deepspeed.template=zero0")
    r, _ = train(tmp_path / "off", *common, "deepspeed.template=zero3_offload_all")
    assert r["zero_stage"] == 3
    assert losses(tmp_path / "off") == pytest.approx(losses(tmp_path / "z0"), rel=1e-5)


def test_lora_kept_as_adapter(tmp_path):
    from pipeline.export import load_exported

    out = tmp_path / "adapter"
    _, live = train(out, "method.name=cot", *LORA, "train.export=true", "train.export_merge_lora=false",
                    "train.max_steps=2", "train.learning_rate=3e-2", logits=True)
    assert (out / "export" / "adapter_config.json").is_file()
    exported = load_exported(out / "export")
    assert exported.meta["lora"] == "adapter"
    with torch.no_grad():
        torch.testing.assert_close(exported.model(input_ids=PROBE_IDS).logits, live, atol=1e-5, rtol=1e-5)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "term"
    overrides = [*TINY_OVERRIDES, "train.max_steps=40", "train.per_device_train_batch_size=2"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path), "variants": [
        {"name": "term", "overrides": overrides, "sleep_s": 0.2}]}))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist" / "train_variants.py"), str(spec)],
                            cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 90
    while (not log.is_file() or not log.read_text()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["interrupted"] and 0 < result["step"] < 40
    assert (out / "checkpoints" / "latest").read_text() == f"step_{result['step']}"
    resumed, _ = train(out, *overrides[len(TINY_OVERRIDES):])
    assert resumed["resumed"] and resumed["step"] == 40


def test_reset_optimizer_clears_adam_state(tmp_path):
    from pipeline.strategy import Strategy
    from pipeline.train import build_module, load_run_tokenizer

    cfg = load_config(None, [*TINY_OVERRIDES, f"train.output_dir={tmp_path}"])
    tok = load_run_tokenizer(cfg, tmp_path)
    module, collate, loaded = build_module(cfg, tok)
    strategy = Strategy(cfg)
    strategy.prepare(module, total_steps=4)
    from pipeline.data import read_source
    batch = collate(read_source("gsm8k_aug", cfg.data.train[0].path, max_examples=8).examples)
    from pipeline.methods import StepContext
    for _ in range(2):
        loss, _ = strategy.forward(batch, StepContext())
        strategy.backward(loss)
        assert strategy.step()
        assert strategy.optimizer.state
        strategy.reset_optimizer()
        assert not strategy.optimizer.state


@pytest.mark.parametrize("kind", ["full", "shared", "separate", "main"])
def test_step_decoder_export_reads_latents_like_the_live_one(tmp_path, kind):
    """train.export_step_decoder=true: out/step_decoder is a plain causal LM (the shared decoder's
    adapter merged into a copy of the base) that reads latents exactly as in training."""
    from pipeline.export import load_exported
    from pipeline.methods import step_decoder

    latents = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    live = {}

    def on_end(strategy, tokenizer):
        parts = strategy.engine.module.parts
        live["texts"] = step_decoder.generate_steps(parts, strategy.cfg, latents, tokenizer, max_new_tokens=6)

    from pipeline.train import run
    extra = {"full": [], "shared": LORA, "separate": ["method.simcot.decoder_model=tiny-llama"], "main": []}[kind]
    per_step = 2 if kind == "full" else 1       # the meta records it: the latent report pairs latent k with step k // c
    extra = [*extra, f"method.simcot.latents_per_step={per_step}"]
    cfg = load_config(None, [*TINY_OVERRIDES, *extra, "method.name=simcot", f"method.simcot.decoder={kind}",
                             "train.export=true", "train.export_step_decoder=true", "train.max_steps=2",
                             "train.learning_rate=3e-2", f"train.output_dir={tmp_path}"])
    run(cfg, on_end=on_end)
    exported = load_exported(tmp_path / "export")
    assert exported.meta["has_step_decoder"] and exported.meta["step_decoder"] == {"kind": kind, "latents_per_step": per_step}
    assert exported.step_decoder.decode_latents(latents, max_new_tokens=6) == live["texts"]


def test_step_decoder_is_not_exported_by_default(tmp_path):
    from pipeline.export import load_exported

    train(tmp_path, *LORA, "method.name=simcot", "method.simcot.decoder=shared", "train.export=true",
          "train.max_steps=1")
    exported = load_exported(tmp_path / "export")
    assert exported.step_decoder is None and not exported.meta["has_step_decoder"]
    assert not (tmp_path / "export" / "step_decoder").exists()
    assert not any("step_decoder" in k for k in exported.model.state_dict())   # adapter dropped, not merged


def test_bf16_trains_bf16_modules_with_fp32_master_weights(tmp_path):
    """bf16 runs keep an fp32 master copy of every trained weight, the CODI projection included
    (in bf16 most updates at small learning rates would round to nothing)."""
    from pipeline.train import run

    captured = {}
    cfg = load_config(None, [*TINY_OVERRIDES, f"train.output_dir={tmp_path}", "method.name=codi", "model.dtype=bf16",
                             "train.max_steps=2", "train.export=false"])
    result = run(cfg, on_end=lambda strategy, tokenizer: captured.update(strategy=strategy))
    engine = captured["strategy"].engine
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    masters = [p for group in engine.optimizer.optimizer.param_groups for p in group["params"]]
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    assert masters and {p.dtype for p in masters} == {torch.float32}
    assert sum(p.numel() for p in masters) == sum(p.numel() for p in trained)
    assert result["step"] == 2 and all(map(lambda v: v == v, losses(tmp_path)))   # finite, no NaN
