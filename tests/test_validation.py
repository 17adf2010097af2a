"""Validation during training (train.eval_steps): the harness's generation and scoring on data.eval,
the best checkpoint kept and exported, and the same on 2 ranks under ZeRO-3 (no hang)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from train_variants import TINY_OVERRIDES  # noqa: E402

from pipeline.config import ConfigError, load_config  # noqa: E402

EVAL = ['data.eval=[{"format": "gsm8k_aug", "path": "%s", "max_examples": 12}]'
        % (ROOT / "tests" / "fixtures" / "gsm8k_aug_test.txt")]
VALIDATED = [*TINY_OVERRIDES, *EVAL, "train.max_steps=6", "train.eval_steps=2", "eval.batch_size=5",
             "eval.max_new_tokens=8", "train.metric_for_best_model=loss"]


def _log(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval/accuracy" in r]


def test_eval_steps_needs_eval_data_and_best_needs_eval_steps():
    with pytest.raises(ConfigError, match="train.eval_steps: validation during training needs data.eval"):
        load_config(None, ["train.eval_steps=5"])
    with pytest.raises(ConfigError, match="train.load_best_model_at_end: needs train.eval_steps"):
        load_config(None, ["train.load_best_model_at_end=true"])


def test_best_checkpoint_is_kept_logged_and_exported(tmp_path):
    """Every eval_steps a validation record; checkpoints/best names the lowest validation loss, is
    never pruned (save_total_limit=1), and the export is that checkpoint (load_best_model_at_end)."""
    from pipeline.export import export_from_checkpoint
    from pipeline.train import run

    out = tmp_path / "run"
    cfg = load_config(None, [*VALIDATED, "method.name=codi", "train.save_steps=1", "train.save_total_limit=1",
                             "train.load_best_model_at_end=true", "train.export=true",
                             "train.learning_rate=3e-2", f"train.output_dir={out}"])
    result = run(cfg)
    _, evals = _log(out)
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = min(evals, key=lambda r: r["eval/loss"])      # ties keep the earlier one, as `improved` does
    assert (out / "checkpoints" / "best").read_text() == f"step_{best['step']}"
    assert (out / "checkpoints" / f"step_{best['step']}").is_dir()
    assert [r["step"] for r in evals if r["eval/best"]][-1] == best["step"]
    assert result["best_step"] == best["step"] and result["exported"] == "best"
    assert result["best_loss"] == pytest.approx(best["eval/loss"])
    assert (out / "train_curves.png").stat().st_size > 0
    # The export holds the best checkpoint's weights, not the last step's.
    again = export_from_checkpoint(out / "checkpoints" / f"step_{best['step']}", tmp_path / "again")
    exported, reference = load_file(str(out / "export" / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert exported.keys() == reference.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], reference[key])
    if best["step"] != 6:   # and they differ from the last step's (the run kept training after the best)
        last = export_from_checkpoint(out / "checkpoints" / "step_6", tmp_path / "last")
        final = load_file(str(last / "model.safetensors"))
        assert any(not torch.equal(final[k], exported[k]) for k in exported)


@pytest.mark.parametrize("method", ["codi", "cot"])
def test_validation_predictions_are_the_harness_predictions(tmp_path, method):
    """validate() generates exactly what `latent-eval` generates from the export of the same model."""
    from evaluation.adapters import DecodeConfig, LatentAdapter
    from pipeline.train import run
    from pipeline.validation import load_validation_set, validate

    out = tmp_path / method
    cfg = load_config(None, [*VALIDATED, f"method.name={method}", "train.max_steps=3", "train.export=true",
                             "train.learning_rate=3e-2", f"train.output_dir={out}"])
    captured = {}

    def on_end(strategy, tokenizer):
        from pipeline.methods import StepContext, build_method
        valid = load_validation_set(cfg)
        _, collate = build_method(cfg, _Loaded(tokenizer, strategy))
        captured.update(validate(strategy, cfg, tokenizer, valid, collate, StepContext()), valid=valid)

    run(cfg, on_end=on_end)
    adapter = LatentAdapter.from_exported(out / "export", decode=DecodeConfig(max_new_tokens=8))   # eval.max_new_tokens
    gens = adapter.generate(captured["valid"].instances, seed=41)
    expected = {inst.id: g.text for inst, g in zip(captured["valid"].instances, gens)}
    assert captured["predictions"] == expected
    assert captured["n"] == 12 and 0 <= captured["accuracy"] <= 100


class _Loaded:
    """What build_method needs to make a collate for validation in the test (tokenizer, ids, size)."""

    def __init__(self, tokenizer, strategy):
        from pipeline.models import add_latent_tokens
        self.tokenizer, self.token_ids = tokenizer, add_latent_tokens(tokenizer)
        self.model = strategy.engine.module.parts["lm"]
        self.hidden_size = self.model.config.hidden_size


def test_validation_on_two_ranks_under_zero3(tmp_path):
    """2 ranks, ZeRO-3: 11 validation examples split 6/5 (rank 1 pads its last batch with a dummy row),
    decode loops of different lengths agreed across ranks: the run finishes, logs every validation,
    and keeps the best checkpoint by validation loss."""
    from test_engine_dist import launch

    overrides = [*VALIDATED, "method.name=simcot", "method.simcot.decoder=full", "deepspeed.enabled=true",
                 "deepspeed.template=zero3", "train.per_device_train_batch_size=4", "train.max_steps=4",
                 "train.load_best_model_at_end=true", "train.export=true",
                 EVAL[0].replace('"max_examples": 12', '"max_examples": 11')]
    launch({"out": str(tmp_path), "variants": [{"name": "zero3", "overrides": overrides}]}, tmp_path, timeout=300)
    result = json.loads((tmp_path / "zero3" / "result.json").read_text())
    evals = result["evals"]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval/n"] == 11 for r in evals)
    best = min(evals, key=lambda r: r["eval/loss"])
    assert (tmp_path / "zero3" / "checkpoints" / "best").read_text() == f"step_{best['step']}"
    assert result["exported"] == "best" and (tmp_path / "zero3" / "export" / "latent_meta.json").is_file()
