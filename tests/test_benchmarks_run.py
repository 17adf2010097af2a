"""benchmarks/run.py (the one issue-12 benchmark command) and the measure() functions it calls,
at tiny sizes: every script's code runs in CI; the figures themselves are not asserted (timings)."""
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

FAKE = '''
def measure(quick=False, size=3):
    return {"benchmark": "fake", "quick": quick, "size": size,
            "targets": [{"what": "fake ratio", "value": 1.5, "target": "<= 2.0x", "met": True}],
            "target": {"what": "single ratio", "ratio": 2.5, "met": False}}
'''


@pytest.fixture
def runner(tmp_path, monkeypatch):
    run = importlib.import_module("run")
    (tmp_path / "bench_fake.py").write_text(FAKE)
    (tmp_path / "bench_broken.py").write_text("def measure():\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(run, "BENCHMARKS", {
        "fake": ("bench_fake", "a fake benchmark", {"quick": True, "not_an_argument": 1}),
        "broken": ("bench_broken", "raises", {}),
        "absent": ("bench_absent", "from another branch", {}),
    })
    return run


def test_run_reports_targets_skips_absent_and_survives_a_failure(runner, tmp_path, capsys):
    out = tmp_path / "summary.json"
    rc = runner.main(["--quick", "--json", str(out)])
    summary = json.loads(out.read_text())
    assert rc == 1                                           # a failed benchmark and an unmet target
    b = summary["benchmarks"]
    assert b["fake"]["status"] == "ran" and b["fake"]["result"]["quick"] is True      # quick kwargs it accepts only
    assert [t["met"] for t in b["fake"]["targets"]] == [True, False]
    assert b["fake"]["targets"][1]["value"] == 2.5
    assert b["broken"]["status"] == "failed" and "boom" in b["broken"]["error"]
    assert b["absent"]["status"] == "skipped" and "not in this checkout" in b["absent"]["note"]
    assert summary["failed"] == ["broken"] and summary["all_targets_met"] is False
    table = capsys.readouterr().out
    assert "| fake | fake ratio | 1.50x | <= 2.0x | yes |" in table and "| absent |" in table


def test_only_selects_and_rejects_unknown_names(runner, tmp_path):
    assert runner.main(["--only", "absent", "--json", str(tmp_path / "s.json")]) == 0      # skips do not fail
    with pytest.raises(SystemExit):
        runner.main(["--only", "nope"])


def test_inference_measure_at_tiny_size():
    bench = importlib.import_module("bench_inference")
    r = bench.measure(examples=4, batch_sizes=(1, 4), batch1_examples=2, passes=1, latents=2)
    assert set(r["speedup_latent_over_cot"]) == {"1", "4"} and r["targets"] == []
    assert r["forced_tokens"]["latent_total"] == 2 + r["forced_tokens"]["latent_decoded"]
    assert "speed-up latent / CoT" in bench.report(r)


def test_token_rows_measure_at_tiny_size():
    bench = importlib.import_module("bench_token_rows")
    r = bench.measure(vocab=512, dim=64, tokens=64, head_rows=4, calls=1, memory=False)
    assert set(r["parts"]) == {"embed", "head"}                 # outputs and row gradients were checked equal
    import argparse
    args = argparse.Namespace(vocab=512, dim=64, dtype="bf16", tokens=64, head_rows=4, calls=1)
    assert bench.peak_rss_growth(args, "ours", "embed") >= 0
    assert "peft / ours" in bench.report(r)
