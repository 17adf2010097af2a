"""method.coconut.reset_optimizer: stage | epoch | never (issue 10.8). The engine forgets AdamW's
moments exactly when the flag says, also across a resume from mid-epoch, and the old boolean key
is rejected naming the new one."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from train_variants import TINY_OVERRIDES  # noqa: E402

from pipeline.config import ConfigError, load_config  # noqa: E402

# 8 examples, micro batch 4: 2 optimizer steps per epoch, 2 epochs per stage, 8 steps = epochs 0-3:
# stage 0 for steps 1-4, stage 1 for steps 5-8.
COCONUT = [*TINY_OVERRIDES, "method.name=coconut", "method.coconut.c_thought=1", "method.coconut.max_latent_stage=2",
           "method.coconut.epochs_per_stage=2", "data.train.0.max_examples=8", "train.per_device_train_batch_size=4",
           "train.max_steps=8", "train.lr_scheduler_type=constant"]
# optimizer steps done when each reset happened, and the AdamW step count at the end
EXPECTED = {"stage": ([4], 4), "epoch": ([2, 4, 6], 2), "never": ([], 8)}


def train(out: Path, mode: str, monkeypatch, *extra: str) -> tuple[list[int], int, dict]:
    """Run; returns (engine steps at each reset, AdamW's step count at the end, result)."""
    from pipeline.strategy import Strategy
    from pipeline.train import run

    resets, original = [], Strategy.reset_optimizer

    def recording(self):
        resets.append(self.engine.global_steps)
        original(self)
        assert not self.optimizer.state        # the moments are gone

    monkeypatch.setattr(Strategy, "reset_optimizer", recording)
    end = {}

    def on_end(strategy, tokenizer):
        end["adam_steps"] = {int(s["step"]) for s in strategy.optimizer.state.values()}

    cfg = load_config(None, [*COCONUT, f"method.coconut.reset_optimizer={mode}", f"train.output_dir={out}", *extra])
    result = run(cfg, on_end=on_end)
    (adam_steps,) = end["adam_steps"]                  # every parameter's state restarted together
    return resets, adam_steps, result


@pytest.mark.parametrize("mode", EXPECTED)
def test_optimizer_state_resets_exactly_when_the_flag_says(tmp_path, monkeypatch, mode):
    resets, adam_steps, result = train(tmp_path, mode, monkeypatch)
    assert result["step"] == 8 and result["stage"] == 1
    assert (resets, adam_steps) == EXPECTED[mode]


def test_resume_mid_epoch_does_not_reset_again(tmp_path, monkeypatch):
    """Resumed at step 3 (mid-epoch 1) with `epoch`: resets at steps 4 and 6 only, and the run
    continues exactly as the uninterrupted one."""
    import json

    train(tmp_path / "full", "epoch", monkeypatch, "train.save_steps=1", "train.save_total_limit=8")
    run_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", run_dir)
    for later in range(4, 9):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{later}")
    (run_dir / "checkpoints" / "latest").write_text("step_3")
    resets, adam_steps, result = train(run_dir, "epoch", monkeypatch, "train.save_steps=1",
                                       "train.save_total_limit=8")
    assert result["resumed"] and (resets, adam_steps) == ([4, 6], 2)
    losses = [[json.loads(line)["loss"] for line in (d / "train_log.jsonl").read_text().splitlines()]
              for d in (tmp_path / "full", run_dir)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_old_key_is_rejected_naming_the_new_one(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("method:\n  coconut:\n    reset_optimizer_on_stage_change: true\n")
    with pytest.raises(ConfigError, match=r"method\.coconut\.reset_optimizer_on_stage_change: this key was "
                                          r"replaced \(.*old\.yaml, line 3\); use method\.coconut\.reset_optimizer"):
        load_config(config)
    with pytest.raises(ConfigError, match="stage, epoch, never"):
        load_config(None, ["method.coconut.reset_optimizer=sometimes"])
