"""AddSub, SingleEq (MAWPS layout) and ASDiv (published XML, and JSONL): loaders, golds, oracle 100 %."""
import json
from pathlib import Path

import pytest

from evaluation.adapters import ConstantAdapter, OracleAdapter
from evaluation.answers import score
from evaluation.benchmarks import BenchmarkFormatError, load_benchmark

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


def _accuracy(adapter, instances, mode="strict"):
    gens = adapter.generate(instances, seed=0)
    return sum(score(g.text, inst)[f"correct_{mode}"] for g, inst in zip(gens, instances)) / len(instances)


@pytest.mark.parametrize("name, filename, golds, first_id", [
    ("addsub", "addsub_small.json", ["70", "5", "9.75"], "1"),
    ("singleeq", "singleeq_small.json", ["48", "30", "9"], "11"),
    ("asdiv", "asdiv_small.xml", ["9", "15", "0.5"], "nluds-0001"),
    ("asdiv", "asdiv_small.jsonl", ["9", "15", "0.5"], "nluds-0001"),
])
def test_loader_golds_and_oracle(name, filename, golds, first_id):
    bench = load_benchmark(name, FIXTURES / filename)
    # Golds parsed independently from the raw file.
    raw = FIXTURES / filename
    if raw.suffix == ".json":
        assert golds == [f"{r['lSolutions'][0]:g}" for r in json.loads(raw.read_text())]
    assert [float(i.gold) for i in bench.instances] == [float(g) for g in golds]
    assert bench.instances[0].id == first_id and all(i.kind == "numeric" for i in bench.instances)
    assert _accuracy(OracleAdapter(), bench.instances) == 1.0
    assert _accuracy(ConstantAdapter({"numeric": golds[1]}), bench.instances) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no shipped file"):
        load_benchmark(name)


def test_asdiv_question_is_body_then_question_and_formula_is_the_step():
    xml = load_benchmark("asdiv", FIXTURES / "asdiv_small.xml").instances
    jsonl = load_benchmark("asdiv", FIXTURES / "asdiv_small.jsonl").instances
    assert xml[0].question == ("Seven red apples and two green apples are in the basket. "
                               "How many apples are in the basket?")
    assert xml[0].reference_steps == ("7+2=9",) and xml[1].source.endswith("asdiv_small.xml:11")
    assert [(i.question, i.gold, i.id) for i in xml] == [(i.question, i.gold, i.id) for i in jsonl]


def test_asdiv_malformed_record_names_line_and_field_and_can_be_skipped(tmp_path):
    text = (FIXTURES / "asdiv_small.xml").read_text().replace("<Answer>15 (balls)</Answer>", "<Answer>many</Answer>")
    bad = tmp_path / "asdiv_bad.xml"
    bad.write_text(text)
    with pytest.raises(BenchmarkFormatError, match=r"asdiv_bad\.xml:11: field 'Answer': expected a number"):
        load_benchmark("asdiv", bad)
    bench = load_benchmark("asdiv", bad, on_malformed="skip")
    assert [i.id for i in bench.instances] == ["nluds-0001", "nluds-0003"]
    assert len(bench.skipped) == 1 and bench.skipped[0].startswith(f"{bad}:11: field 'Answer'")


def test_asdiv_xml_with_entity_declarations_is_refused(tmp_path):
    evil = tmp_path / "evil.xml"
    evil.write_text('<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n'
                    "<ProblemSet><Problem ID='1'><Body>&e;</Body><Question>q</Question>"
                    "<Answer>1</Answer></Problem></ProblemSet>\n")
    with pytest.raises(BenchmarkFormatError, match=r"evil\.xml:2: XML entity declarations are not allowed"):
        load_benchmark("asdiv", evil)


def test_latent_eval_skip_option_writes_the_list_and_error_exits_2(tmp_path, capsys):
    from evaluation.cli import main

    bad = tmp_path / "addsub_bad.json"
    records = json.loads((FIXTURES / "addsub_small.json").read_text())
    records[1]["lSolutions"] = []
    bad.write_text(json.dumps(records, indent=1))
    argv = ["run", "--adapter", "oracle", "--benchmarks", f"addsub={bad}", "--no-progress", "--no-plots"]
    assert main(argv + ["--out", str(tmp_path / "err")]) == 2
    err = capsys.readouterr().err
    assert f"data error: {bad}:" in err and "field 'lSolutions': empty list" in err
    assert main(argv + ["--out", str(tmp_path / "ok"), "--on-malformed", "skip"]) == 0
    lines = (tmp_path / "ok" / "skipped_examples.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{bad}:") and "field 'lSolutions': empty list" in lines[0]
    rows = [json.loads(x) for x in next((tmp_path / "ok").rglob("*.jsonl")).read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["1", "3"] and all(r["correct_strict"] for r in rows)
