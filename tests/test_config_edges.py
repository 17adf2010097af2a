"""Config edges: duplicate YAML keys are rejected naming both lines; a bad config fails before torch."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_env import child_env
from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, key, first, second", [
    ("train:\n  learning_rate: 1e-3\n  seed: 3\n  learning_rate: 2e-3\n", "train.learning_rate", 2, 4),
    ("method:\n  name: codi\nmethod:\n  name: cot\n", "method", 1, 3),
    ("data:\n  train:\n    - format: gsm8k_aug\n      path: a\n      path: b\n", "data.train.0.path", 4, 5),
])
def test_duplicate_yaml_key_is_rejected_naming_both_lines(tmp_path, text, key, first, second):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup\.yaml: duplicate key '{key}' at line {second} "
                                          rf"\(first given at line {first}\)"):
        load_config(path)


def test_yaml_merge_keys_still_work(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: {seed: 3, logging_steps: 5}\n  seed: 4\n")   # explicit key overrides merge
    cfg = load_config(path)
    assert (cfg.train.seed, cfg.train.logging_steps) == (4, 5)


def test_bad_config_fails_fast_without_importing_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: fast\n")
    code = ("import sys, time; t = time.perf_counter(); from pipeline.train import main; "
            f"rc = main(['--config', '{bad}']); "
            "print('TORCH', 'torch' in sys.modules, round(time.perf_counter() - t, 3)); sys.exit(rc)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=60)
    wall = time.perf_counter() - start
    assert proc.returncode == 2 and "train.learning_rate: expected float" in proc.stderr, proc.stderr
    flag, seconds = proc.stdout.split()[1:]
    assert flag == "False"                               # torch never imported
    assert float(seconds) < 1.0, (seconds, wall)


def test_drop_last_step_with_codi_dropping_it_too_is_rejected():
    with pytest.raises(ConfigError, match=r"data\.drop_last_step: .*method\.codi\.include_last_step=false"):
        load_config(None, ["method.name=codi", "data.drop_last_step=true"])
    with pytest.raises(ConfigError, match=r"data\.drop_last_step"):
        load_config(None, ["method.name=simcot", "method.simcot.base=codi", "data.drop_last_step=true",
                           "model.lora.enabled=true"])
    # One drop only: fine.
    load_config(None, ["method.name=codi", "data.drop_last_step=true", "method.codi.include_last_step=true"])
    load_config(None, ["method.name=cot", "data.drop_last_step=true"])
