"""latent-study: the summary schema, the report, resumption, data resolution (tiny runs, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch_env import child_env
from pipeline.data.synthetic import TaskSpec, write_task
from pipeline.study.catalogue import COMMON, METHODS, resolve_data
from pipeline.study.report import decoded_step_shares, normalise_step, summarise, write_report
from pipeline.study.runner import Cell, overrides_for, plan_cells

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.max_steps=3", "train.eval_steps=2", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
        "model.tiny.intermediate_size=64", "train.per_device_train_batch_size=8", "eval.max_new_tokens=12"]


def _cell_result(method, seed, acc, acc2=None):
    r = {"method": method, "seed": seed, "accuracy": acc, "accuracy_strict": acc - 1, "best_valid_accuracy": acc,
         "train_seconds": 1.0, "num_latents": 6 if METHODS[method].latent else 0}
    if acc2 is not None:
        r["accuracy_2x"] = acc2
    return r


def test_summary_schema_means_and_gap(tmp_path):
    write_task(TaskSpec(train=20, valid=5, test=5), tmp_path / "d")
    data = resolve_data(str(tmp_path / "d"), tmp_path)
    results = {Cell("nocot", 0): _cell_result("nocot", 0, 10.0), Cell("nocot", 1): _cell_result("nocot", 1, 20.0),
               Cell("cot", 0): _cell_result("cot", 0, 90.0), Cell("cot", 1): _cell_result("cot", 1, 90.0),
               Cell("simcot", 0): _cell_result("simcot", 0, 50.0, 40.0),
               Cell("simcot", 1): _cell_result("simcot", 1, 60.0, 44.0)}
    s = summarise(results, data, ["nocot", "cot", "simcot"], tmp_path, {"seeds": 2})
    assert set(s["methods"]) == {"nocot", "cot", "simcot"} and s["data"]["name"] == "d"
    sim = s["methods"]["simcot"]
    assert sim["accuracy_mean"] == pytest.approx(55.0) and sim["accuracy_std"] == pytest.approx(7.0710678)
    assert sim["per_seed"] == [50.0, 60.0] and sim["accuracy_2x_mean"] == pytest.approx(42.0)
    assert "accuracy_2x_mean" not in s["methods"]["cot"]
    assert s["gap_closed"]["simcot"] == pytest.approx((55 - 15) / (90 - 15))
    write_report(s, tmp_path, plots=True)
    assert json.loads((tmp_path / "summary.json").read_text())["methods"]["cot"]["accuracy_mean"] == 90.0
    md = (tmp_path / "results.md").read_text()
    assert "| simcot (n=6) | 55.0 ± 7.1 | 50.0, 60.0 |" in md
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "latents_1x_2x.png").is_file()


def test_decoded_step_share_is_exact_match_per_latent(tmp_path):
    rows = [{"latents": [{"latent": 0, "reference": "<<3+4=7>>", "step_decoder": "<< 3+4 = 7>>"},
                         {"latent": 1, "reference": "<<7*2=14>>", "step_decoder": "<<7*2=15>>"},
                         {"latent": 2, "reference": None, "step_decoder": "<<1+1=2>>"}]},
            {"latents": [{"latent": 0, "reference": "<<5-1=4>>", "step_decoder": "<<5-1=4>>"},
                         {"latent": 1, "reference": "<<4+4=8>>", "step_decoder": "<<4+4=8>>"}]}]
    (tmp_path / "latent_report.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shares = decoded_step_shares(tmp_path)
    assert shares["latents"] == [0, 1] and shares["per_latent"] == [100.0, 50.0]
    assert shares["overall"] == pytest.approx(75.0) and normalise_step(" <<1 + 2=3>> ") == "<<1+2=3>>"


def test_cells_overrides_and_dependencies(tmp_path):
    write_task(TaskSpec(train=20, valid=5, test=5), tmp_path / "d")
    data = resolve_data(str(tmp_path / "d"), tmp_path)
    cells = plan_cells(["coconut", "codi"], 2)
    assert [(c.method, c.seed) for c in cells] == [("cot", 0), ("coconut", 0), ("codi", 0),
                                                   ("cot", 1), ("coconut", 1), ("codi", 1)]
    args = overrides_for(Cell("coconut", 1), data, tmp_path, quick=False, extra=["train.max_steps=7"])
    assert f"method.coconut.init_from={tmp_path / 'runs' / 'cot' / 'seed1' / 'export'}" in args
    assert "train.seed=12" in args and args[-1] == "train.max_steps=7"
    assert "train.max_steps=600" in args           # from the CoT-SFT export: half as long; extras come after
    assert "train.max_steps=400" in overrides_for(Cell("coconut", 1), data, tmp_path, quick=True, extra=[])
    codi = overrides_for(Cell("codi", 0), data, tmp_path, quick=False, extra=[])
    assert f"train.max_steps={COMMON['train.max_steps']}" in codi
    assert any(a.startswith("data.eval=") and "valid.txt" in a for a in args)


def test_data_resolution_of_shipped_and_missing_tasks(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a directory with train.txt"):
        resolve_data(str(tmp_path / "nothing"), tmp_path)
    chain = resolve_data("chain", tmp_path)
    assert Path(chain.test).is_file() and chain.format == "gsm8k_aug"
    shared = ROOT.parent / "shared" / "data"
    if not (shared / "prontoqa").is_dir():
        pytest.skip("../shared/data is absent")
    pronto = resolve_data("prontoqa", tmp_path)
    assert pronto.format == "prontoqa" and pronto.train.endswith("prontoqa_train.json")
    prosqa = resolve_data("prosqa", tmp_path)
    train, valid = json.loads(Path(prosqa.train).read_text()), json.loads(Path(prosqa.valid).read_text())
    assert len(train) == 240 and len(valid) == 60
    assert not {r["question"] for r in train} & {r["question"] for r in valid}


@pytest.mark.timeout(900)
def test_study_end_to_end_then_resume(tmp_path):
    """Two methods x 1 seed on a tiny task: every output is written; a rerun skips finished cells; a
    cell whose cell.json is gone (killed after training) is redone from its finished training run."""
    write_task(TaskSpec(train=120, valid=10, test=10), tmp_path / "task")
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "pipeline.study.cli", "--data", str(tmp_path / "task"), "--out", str(out),
           "--methods", "nocot,simcot", "--seeds", "1", "--jobs", "2", "--", *TINY]
    first = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"nocot", "simcot"}
    for entry in summary["methods"].values():
        assert {"accuracy_mean", "accuracy_std", "per_seed"} <= set(entry) and len(entry["per_seed"]) == 1
    assert "accuracy_2x_mean" in summary["methods"]["simcot"] and "simcot" in summary["interpretability"]
    for name in ("results.md", "accuracy.png", "curves.png", "latents_1x_2x.png", "interpretability.png"):
        assert (out / name).is_file(), name
    cell = out / "runs" / "simcot" / "seed0"
    assert (cell / "train_curves.png").is_file() and (cell / "latents" / "latent_report.jsonl").is_file()
    stamp = (out / "runs" / "nocot" / "seed0" / "cell.json").stat().st_mtime
    (cell / "cell.json").unlink()
    second = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=800)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "1 finished cells found" in second.stdout and "start simcot seed 0" in second.stdout
    assert "start nocot" not in second.stdout
    assert (out / "runs" / "nocot" / "seed0" / "cell.json").stat().st_mtime == stamp
    assert json.loads((cell / "cell.json").read_text())["steps"] == 3


def test_shipped_recipe_is_the_study_cell(tmp_path, small_chain_root):
    """recipes/configs/chain_simcot_cpu.yaml trains what the study's SIM-CoT cell trains (issue 13's
    recipe): same model, method, schedule and selection; only the paths differ."""
    from pipeline.config import load_config

    data_dir = small_chain_root / "data" / "chain"
    assert (data_dir / "tokenizer" / "tokenizer.json").is_file()
    paths = [f"data.train.0.path={data_dir / 'train.txt'}", f"data.eval.0.path={data_dir / 'valid.txt'}",
             f"model.tokenizer={data_dir / 'tokenizer'}"]
    shipped = load_config(ROOT / "recipes" / "configs" / "chain_simcot_cpu.yaml", paths)
    study = load_config(None, overrides_for(Cell("simcot", 0), resolve_data(str(data_dir), tmp_path), tmp_path,
                                            quick=False, extra=[]))
    assert shipped.method == study.method and shipped.model.tiny == study.model.tiny
    for name in ("seed", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                 "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_grad_norm", "eval_steps",
                 "metric_for_best_model", "load_best_model_at_end", "export_step_decoder"):
        assert getattr(shipped.train, name) == getattr(study.train, name), name


def test_ablations_change_one_thing_of_the_simcot_recipe():
    from pipeline.study.catalogue import ABLATIONS

    base = METHODS["simcot"].overrides
    for name, spec in ABLATIONS.items():
        changed = {k: v for k, v in spec.overrides.items() if base.get(k) != v}
        assert changed and set(base) <= set(spec.overrides), name
        assert len(changed) <= 2 and name in METHODS and spec.simcot, (name, changed)


def test_only_seeds_trains_the_listed_seeds(tmp_path, monkeypatch):
    """--only-seeds: a second process trains seeds 1,2 into the OUT another process fills with seed 0."""
    import pipeline.study.report as report
    import pipeline.study.runner as runner
    from pipeline.study.cli import main

    asked = []
    monkeypatch.setattr(runner, "run_cells", lambda cells, *a, **k: asked.extend(cells) or {})
    monkeypatch.setattr(report, "summarise", lambda *a, **k: {})
    monkeypatch.setattr(report, "write_report", lambda summary, out, plots: (out / "results.md").write_text("-"))
    write_task(TaskSpec(train=20, valid=5, test=5), tmp_path / "d")
    code = main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--methods", "nocot,coconut",
                 "--seeds", "3", "--only-seeds", "1,2"])
    assert code == 1                                      # nothing finished: reported as missing
    assert [(c.method, c.seed) for c in asked] == [(m, s) for s in (1, 2) for m in ("cot", "nocot", "coconut")]
    assert main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--only-seeds", "one"]) == 2


def test_report_only_reads_finished_cells_and_trains_nothing(tmp_path, monkeypatch):
    import pipeline.study.runner as runner
    from pipeline.study.cli import main

    monkeypatch.setattr(runner, "run_cells", lambda *a, **k: pytest.fail("--report-only must not train"))
    write_task(TaskSpec(train=20, valid=5, test=5), tmp_path / "d")
    out = tmp_path / "o"
    for method, seed, acc in (("nocot", 0, 10.0), ("cot", 0, 90.0), ("cot", 2, 80.0)):
        cell = runner.Cell(method, seed).dir(out)
        cell.mkdir(parents=True)
        (cell / runner.CELL_FILE).write_text(json.dumps(_cell_result(method, seed, acc)))
    code = main(["--data", str(tmp_path / "d"), "--out", str(out), "--methods", "nocot,cot", "--seeds", "3",
                 "--report-only", "--no-plots"])
    assert code == 1                                     # 3 of 6 cells are missing, and said so
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["cot"]["per_seed"] == [90.0, 80.0] and summary["methods"]["cot"]["seeds"] == [0, 2]
    assert summary["gap_closed"] == {} and summary["config"]["wall_seconds"] is None


def test_steps_trend_plot_reads_summaries(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from plot_steps_trend import load_points, main

    paths = []
    for steps, (nocot, cot) in {1200: ([10.0, 12.0], [99.0, 97.0]), 400: ([7.0], [20.0])}.items():
        results = {Cell(m, s): _cell_result(m, s, a) for m, accs in (("nocot", nocot), ("cot", cot))
                   for s, a in enumerate(accs)}
        summary = summarise(results, resolve_data("chain", tmp_path), ["nocot", "cot"], tmp_path, {})
        paths.append(tmp_path / f"s{steps}.json")
        paths[-1].write_text(json.dumps(summary))
    pairs = [f"1200={paths[0]}", f"400={paths[1]}"]
    points = load_points(pairs, ["nocot", "cot", "simcot"])
    assert points["cot"] == [(400, 20.0, 0.0, 1), (1200, 98.0, pytest.approx(1.414, abs=1e-3), 2)]
    assert "simcot" not in points
    assert main([*pairs, "--methods", "nocot,cot", "--out", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 1000
