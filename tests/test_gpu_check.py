"""scripts/gpu_check.sh (issue 12.6): without CUDA it fails fast and says why; `--cpu-smoke` runs
every CPU-capable part (attention comparison, the three methods' training steps through DeepSpeed,
the planner comparison, a 2-process all-reduce) at tiny size and writes the JSON report."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch_env import child_env

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = child_env(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("DS_ACCELERATOR", None)          # the script must set it itself for --cpu-smoke
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_2_with_a_clear_message(tmp_path):
    start = time.perf_counter()
    proc = run("--out", str(tmp_path / "r.json"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert not (tmp_path / "r.json").exists()                 # nothing ran, nothing written
    assert time.perf_counter() - start < 300


def test_cpu_smoke_runs_every_part_and_reports_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run("--cpu-smoke", "--out", str(out))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(out.read_text())
    assert result["ok"] and result["device_info"]["cpu_smoke"] and not result["failed"]
    att = result["attention"]
    assert att["status"] == "passed" and att["compared"] == "eager vs sdpa"
    assert set(att["rel_err"]) == {"prefill_last_hidden", "latents", "suffix_hidden", "suffix_logits"}
    assert att["max_rel_err"] <= att["tolerance"] and att["active_latents_per_row"] == [6, 5, 4]
    for method in ("cot", "codi", "simcot"):
        r = result["train"][method]
        assert r["status"] == "passed", r
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["tflop_per_step"] > 0
        assert r["planner_predicted_gb"] > 0 and r["zero_stage"] == 2
        assert len(r["step_times_s"]) == 2
    # SIM-CoT = CODI + the step decoder in counted FLOPs. (CODI vs CoT-SFT depends on the shape: on
    # the smoke model the vocabulary dominates, and CODI's question pass and latents compute no logits.)
    flops = {m: result["train"][m]["tflop_per_step"] for m in ("cot", "codi", "simcot")}
    assert 0 < flops["codi"] < flops["simcot"] and flops["cot"] > 0
    assert result["train"]["cot"]["step_ratio_vs_cot"] == pytest.approx(1.0)
    assert {t["what"].split()[0] for t in result["targets"]} == {"codi", "simcot"}
    n = result["nccl"]
    assert n["status"] == "passed" and n["backend"] == "gloo" and n["world_size"] == 2 and n["value_check"]
    printed = proc.stdout[proc.stdout.index('{\n  "check": "gpu_check"'):]           # the JSON is printed too
    assert json.loads(printed[:printed.index("\n}\n") + 2]) == result
    assert "| simcot |" in proc.stdout and "checks OK" in proc.stdout


def test_a_failed_part_fails_the_run():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    result = gpu_check.summarise({"attention": {"status": "failed"}, "nccl": {"status": "passed"},
                                  "train": {"cot": {"status": "passed", "step_s": 1.0},
                                            "codi": {"status": "passed", "step_s": 2.0},
                                            "simcot": {"status": "failed", "error": "x"}}})
    assert not result["ok"] and result["failed"] == ["attention", "train.simcot"]
    assert result["train"]["codi"]["step_ratio_vs_cot"] == 2.0
    assert [t["met"] for t in result["targets"]] == [False]            # CODI 2.0x > 1.7x
