"""The runner end to end: a 3-seed sweep with a tiny random latent model writes every output;
an interrupted sweep resumes from its per-sample files; data-parallel shards merge in order;
batch size 1 and 32 give identical predictions."""
import importlib.util
import json
from pathlib import Path

import pytest

from evaluation.adapters import DecodeConfig, LatentAdapter, OracleAdapter, PredictionsFileAdapter
from evaluation.benchmarks import BENCHMARKS, load_benchmark
from evaluation.runner import RunConfig, read_rows, run

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
GSM8K_SLICE = HERE / "fixtures" / "gsm8k_train.jsonl"     # a shipped GSM8K slice (same format as test)
_spec = importlib.util.spec_from_file_location("eval_tiny_models", HERE / "fixtures" / "eval" / "tiny_models.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(scope="module")
def latent_adapter():
    tok = tiny.load_tiny_tokenizer()
    model = tiny.tiny_llama(len(tok))
    return LatentAdapter(model, tok, num_latents=2, start_token="<bot>", end_token="<eot>",
                         projection=tiny.codi_projection(32), method="codi", model_name="tiny-llama",
                         decode=DecodeConfig(max_new_tokens=6))


class Counting:
    """Wraps an adapter and records which instance ids it was asked to generate."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.method, self.model_name = inner.method, inner.model_name
        self.default_num_latents = inner.default_num_latents

    def generate(self, instances, seed, num_latents=None):
        self.seen += [(seed, num_latents, i.id) for i in instances]
        return self.inner.generate(instances, seed, num_latents)

    def describe(self):
        return self.inner.describe()


def _cfg(out, **kw):
    base = dict(out_dir=str(out), benchmarks=[("gsm8k", str(GSM8K_SLICE))], seeds=[41, 42, 43],
                num_latents=[1, 2], batch_size=4, limit=6, progress=False)
    return RunConfig(**{**base, **kw})


def test_three_seed_sweep_writes_all_outputs(tmp_path, latent_adapter):
    results = run(latent_adapter, _cfg(tmp_path))
    for n in (1, 2):
        for seed in (41, 42, 43):
            rows = read_rows(tmp_path / "samples" / "gsm8k" / f"latents{n}_seed{seed}.jsonl")
            assert [r["index"] for r in rows] == list(range(6))
            for key in ("question", "gold", "prediction", "raw", "correct", "correct_strict", "generated_tokens",
                        "latents_used", "latency_s"):
                assert key in rows[0], key
            assert all(r["latents_used"] == n and 1 <= r["generated_tokens"] <= 6 for r in rows)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["seeds"] == [41, 42, 43] and saved["num_latents"] == [1, 2] and saved["method"] == "codi"
    assert {"git", "versions", "config"} <= set(saved) and "torch" in saved["versions"]
    assert "commit" in saved["git"] and saved["config"]["adapter"]["num_latents"] == 2
    cells = {(r["benchmark"], r["num_latents"]): r for r in saved["results"]}
    assert set(cells) == {("gsm8k", 1), ("gsm8k", 2)}
    cell = cells[("gsm8k", 2)]
    assert set(cell["per_seed"]) == {"41", "42", "43"} and cell["n"] == 6
    assert set(cell["accuracy"]["flexible"]) == {"mean", "std"} and cell["examples_per_s"] > 0
    assert cell["avg_tokens_incl_latents"] == pytest.approx(cell["avg_generated_tokens"] + 2)
    table = (tmp_path / "results.md").read_text()
    assert "| gsm8k | codi | tiny-llama | 2 | 6 | 3 |" in table and "± " in table
    for png in ("accuracy_by_benchmark.png", "accuracy_vs_latents.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_sweep_resumes_only_missing(tmp_path, latent_adapter):
    cfg = _cfg(tmp_path, seeds=[41, 42], num_latents=[2])
    run(latent_adapter, cfg)
    f41 = tmp_path / "samples" / "gsm8k" / "latents2_seed41.jsonl"
    before = f41.read_text().splitlines()
    # Simulate a crash: two lines lost, the last one half written; seed 42's cell never started.
    f41.write_text("\n".join(before[:3]) + "\n" + before[3][:25])
    (tmp_path / "samples" / "gsm8k" / "latents2_seed42.jsonl").unlink()
    (tmp_path / "results.json").unlink()
    counting = Counting(latent_adapter)
    run(counting, cfg)
    assert sorted(counting.seen) == sorted([(41, 2, str(i)) for i in (3, 4, 5)] + [(42, 2, str(i)) for i in range(6)])
    after = [json.loads(x) for x in f41.read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k != "latency_s"}  # noqa: E731
    assert [strip(r) for r in after] == [strip(json.loads(x)) for x in before]
    assert (tmp_path / "results.json").is_file()
    counting.seen.clear()
    run(counting, cfg)                                   # complete: nothing to do
    assert counting.seen == []


def test_resume_refuses_another_model(tmp_path, latent_adapter):
    run(OracleAdapter(), _cfg(tmp_path, seeds=[41]))
    with pytest.raises(ValueError, match="another configuration"):
        run(latent_adapter, _cfg(tmp_path, seeds=[41]))


def test_batch_size_1_and_32_identical(tmp_path, latent_adapter):
    insts = load_benchmark("gsm8k", GSM8K_SLICE, limit=32).instances
    big = latent_adapter.generate(insts, seed=41)
    one = [latent_adapter.generate([inst], seed=41)[0] for inst in insts]
    assert [g.text for g in big] == [g.text for g in one]
    assert [g.num_generated_tokens for g in big] == [g.num_generated_tokens for g in one]
    r1 = run(latent_adapter, _cfg(tmp_path / "b1", seeds=[41], num_latents=[3], batch_size=1, limit=32))
    r32 = run(latent_adapter, _cfg(tmp_path / "b32", seeds=[41], num_latents=[3], batch_size=32, limit=32))
    raw = lambda d: [r["raw"] for r in read_rows(d / "samples" / "gsm8k" / "latents3_seed41.jsonl")]  # noqa: E731
    assert raw(tmp_path / "b1") == raw(tmp_path / "b32")
    assert r1["results"][0]["accuracy"] == r32["results"][0]["accuracy"]


def test_data_parallel_shards_merge_in_order(tmp_path, latent_adapter, monkeypatch):
    single = tmp_path / "single"
    run(latent_adapter, _cfg(single, seeds=[41], num_latents=[2], limit=7))
    shared = tmp_path / "dp"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")                      # rank 1 finishes first, returns nothing
    assert run(latent_adapter, _cfg(shared, seeds=[41], num_latents=[2], limit=7)) is None
    monkeypatch.setenv("RANK", "0")
    res = run(latent_adapter, _cfg(shared, seeds=[41], num_latents=[2], limit=7, merge_timeout_s=5))
    merged = read_rows(shared / "samples" / "gsm8k" / "latents2_seed41.jsonl")
    ref = read_rows(single / "samples" / "gsm8k" / "latents2_seed41.jsonl")
    assert [r["index"] for r in merged] == list(range(7))
    assert [r["rank"] for r in merged] == [0, 1, 0, 1, 0, 1, 0]
    assert [r["raw"] for r in merged] == [r["raw"] for r in ref]
    assert res["results"][0]["n"] == 7


def test_oracle_through_the_runner_on_every_shipped_benchmark(tmp_path):
    if not DATA.is_dir():
        pytest.skip("../shared/data not present")
    names = [(n, None) for n, s in BENCHMARKS.items() if s.default_path]
    res = run(OracleAdapter(), RunConfig(out_dir=str(tmp_path), benchmarks=names, limit=25, batch_size=16,
                                         progress=False, plots=False))
    assert len(res["results"]) == len(names)
    for r in res["results"]:
        assert r["accuracy"]["strict"]["mean"] == 100.0 and r["accuracy"]["flexible"]["mean"] == 100.0, r


def test_predictions_file_rescored(tmp_path, latent_adapter):
    run(latent_adapter, _cfg(tmp_path / "a", seeds=[41], num_latents=[2]))
    preds = tmp_path / "a" / "samples" / "gsm8k" / "latents2_seed41.jsonl"
    adapter = PredictionsFileAdapter(preds, method="codi")
    res = run(adapter, RunConfig(out_dir=str(tmp_path / "b"), benchmarks=[("gsm8k", str(GSM8K_SLICE))], limit=6,
                                 progress=False, plots=False))
    again = read_rows(tmp_path / "b" / "samples" / "gsm8k" / "seed41.jsonl")
    orig = read_rows(preds)
    assert [(r["raw"], r["correct"], r["generated_tokens"]) for r in again] == \
        [(r["raw"], r["correct"], r["generated_tokens"]) for r in orig]
    assert res["results"][0]["n"] == 6
    with pytest.raises(KeyError, match="no prediction for instance id '6'"):
        adapter.generate(load_benchmark("gsm8k", GSM8K_SLICE, limit=7).instances[6:], seed=0)


def test_published_number_in_table(tmp_path):
    oracle = OracleAdapter()
    oracle.method, oracle.model_name = "codi", "meta-llama/Llama-3.2-1B-Instruct"
    aug = HERE / "fixtures" / "gsm8k_aug_test.txt"
    res = run(oracle, RunConfig(out_dir=str(tmp_path), benchmarks=[("gsm8k_aug", str(aug))], limit=5,
                                progress=False, plots=False))
    assert res["results"][0]["published"] == 52.7
    assert "| 100.00 ± 0.00 | 100.00 ± 0.00 | 52.7 |" in (tmp_path / "results.md").read_text()


def test_cli_run_and_report(tmp_path, capsys):
    from evaluation.cli import main, parse_int_list

    assert parse_int_list("41-45") == [41, 42, 43, 44, 45] and parse_int_list("0,2,4-5") == [0, 2, 4, 5]
    aug = HERE / "fixtures" / "gsm8k_aug_test.txt"
    assert main(["run", "--adapter", "constant", "--constant", "numeric=18", "--benchmarks",
                 f"gsm8k_aug={aug}", "--benchmark", f"multiarith={HERE / 'fixtures/eval/multiarith_small.json'}",
                 "--seeds", "41-42", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["seeds"] == [41, 42] and [r["benchmark"] for r in res["results"]] == ["gsm8k_aug", "multiarith"]
    assert main(["report", str(tmp_path / "r"), str(tmp_path / "r"), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "results.md").read_text().count("| gsm8k_aug | constant | constant |") == 2
    assert (tmp_path / "cmp" / "accuracy_by_benchmark.png").is_file()
