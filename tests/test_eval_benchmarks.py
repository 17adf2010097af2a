"""Every shipped benchmark file: the oracle scores 100 %, a constant answer its expected share.

The expected share is computed here from the raw files with independent parsing, so a loader that
mislabels gold answers or a parser that mis-reads them fails. Malformed files must name the file,
the line and the field.
"""
import json
from collections import Counter
from pathlib import Path

import pytest

from evaluation.adapters import ConstantAdapter, OracleAdapter
from evaluation.answers import score
from evaluation.benchmarks import BenchmarkFormatError, load_benchmark, parse_benchmark_specs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# file → (benchmark, raw gold labels parsed independently of evaluation.benchmarks)
def _golds(rel: str) -> list[str]:
    path = DATA / rel
    if rel.startswith("gsm8k/"):
        return [r["answer"].split("####")[-1].strip().replace(",", "") for r in _jsonl(path)]
    if rel.startswith("gsm8k_aug/"):
        return [line.split("####")[-1].strip().replace(",", "") for line in path.read_text().splitlines()
                if line.strip()]
    if rel.startswith("gsm_hard/"):
        return [repr(float(r["target"])) for r in _jsonl(path)]
    if rel.startswith("svamp/"):
        return [repr(float(r["Answer"])) for r in json.loads(path.read_text())]
    if rel.startswith(("prosqa/", "prontoqa/")):
        return [r["answer"] for r in json.loads(path.read_text())]
    if rel.startswith("commonsenseqa/"):
        return [r["answerKey"] for r in _jsonl(path)]
    if rel.startswith("strategyqa/"):
        return [max(e["target_scores"], key=e["target_scores"].get)
                for e in json.loads(path.read_text())["examples"]]
    if rel.startswith("aqua/"):
        return [r["correct"] for r in _jsonl(path)]
    raise AssertionError(rel)


FILES = {
    "gsm8k/test.jsonl": "gsm8k", "gsm8k/test_socratic.jsonl": "gsm8k", "gsm8k/train.jsonl": "gsm8k",
    "gsm8k_aug/test.txt": "gsm8k_aug", "gsm8k_aug/valid.txt": "gsm8k_aug",
    "gsm_hard/gsmhardv2.jsonl": "gsm_hard", "svamp/SVAMP.json": "svamp",
    "prosqa/prosqa_test.json": "prosqa", "prosqa/prosqa_valid.json": "prosqa",
    "prontoqa/prontoqa_test.json": "prontoqa", "prontoqa/prontoqa_valid.json": "prontoqa",
    "prontoqa/prontoqa_train.json": "prontoqa",
    "commonsenseqa/dev_rand_split.jsonl": "commonsenseqa", "commonsenseqa/train_rand_split.jsonl": "commonsenseqa",
    "strategyqa/task.json": "strategyqa", "aqua/test.json": "aqua",
}


def _accuracy(adapter, instances, mode):
    gens = adapter.generate(instances, seed=0)
    return sum(score(g.text, inst)[f"correct_{mode}"] for g, inst in zip(gens, instances)) / len(instances)


@needs_data
def test_every_data_file_is_covered():
    shipped = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.suffix in (".json", ".jsonl", ".txt")}
    assert shipped - set(FILES) == {"commonsenseqa/test_rand_split_no_answers.jsonl"}


@needs_data
@pytest.mark.parametrize("rel", sorted(FILES))
def test_oracle_100_and_constant_expected_share(rel):
    bench = load_benchmark(FILES[rel], DATA / rel)
    golds = _golds(rel)
    assert [i.gold for i in bench.instances] and len(bench.instances) == len(golds)
    for mode in ("strict", "flexible"):
        assert _accuracy(OracleAdapter(), bench.instances, mode) == 1.0, mode

    # A constant that actually occurs: the most frequent gold label.
    const = Counter(golds).most_common(1)[0][0]
    kind = bench.instances[0].kind
    if kind == "numeric":
        expected = {m: sum(float(g) == float(const) for g in golds) / len(golds) for m in ("strict", "flexible")}
    elif kind == "prosqa":        # strict: the sentence; flexible: the final entity (always a choice)
        last = lambda s: s.rstrip(".").split()[-1]  # noqa: E731
        expected = {"strict": golds.count(const) / len(golds),
                    "flexible": sum(last(g) == last(const) for g in golds) / len(golds)}
    else:
        expected = {m: golds.count(const) / len(golds) for m in ("strict", "flexible")}
    adapter = ConstantAdapter({kind: const})
    for mode in ("strict", "flexible"):
        assert _accuracy(adapter, bench.instances, mode) == pytest.approx(expected[mode]), mode
    assert 0 < expected["flexible"] < 1


@needs_data
def test_constant_yes_on_strategyqa_and_true_on_prontoqa():
    # "True" and "Yes" mean the same; the share equals the fraction of positive labels.
    for name, rel in (("strategyqa", "strategyqa/task.json"), ("prontoqa", "prontoqa/prontoqa_test.json")):
        golds = _golds(rel)
        share = sum(g in ("Yes", "True") for g in golds) / len(golds)
        bench = load_benchmark(name)
        for answer in ("Yes", "True"):
            assert _accuracy(ConstantAdapter({"bool": answer}), bench.instances, "strict") == pytest.approx(share)


@needs_data
def test_instances_carry_choices_steps_and_sources():
    aqua = load_benchmark("aqua", limit=1).instances[0]
    assert aqua.kind == "choice" and len(aqua.choices) == 5 and "Answer Choices: (A)" in aqua.question
    pros = load_benchmark("prosqa", limit=1).instances[0]
    assert pros.choices == ("hilpus", "sterpus") and pros.reference_steps[0] == "Sally is a scrompus."
    aug = load_benchmark("gsm8k_aug", limit=1).instances[0]
    assert aug.reference_steps == ("<<16-3-4=9>>", "<<9*2=18>>") and aug.source.endswith("test.txt:1")
    svamp = load_benchmark("svamp", limit=2).instances
    assert svamp[0].id == "chal-1" and svamp[1].source.endswith("SVAMP.json:10")
    assert load_benchmark("strategyqa", limit=1).instances[0].source.endswith("task.json:19")


def test_multiarith_published_format():
    bench = load_benchmark("multiarith", FIXTURES / "multiarith_small.json")
    first = bench.instances[0]
    assert first.question.startswith("A pet store had 13") and first.gold == "8" and first.id == "1"
    assert first.reference_steps == ("X=((13.0+5.0)-10.0)",)
    assert _accuracy(OracleAdapter(), bench.instances, "strict") == 1.0
    with pytest.raises(ValueError, match="no shipped file"):
        load_benchmark("multiarith")


@pytest.mark.parametrize("name, filename, text, line, field", [
    ("gsm8k", "g.jsonl", '{"question": "q", "answer": "x\\n#### 1"}\n{"question": "q", "answer": "no marker"}\n',
     2, "answer"),
    ("gsm8k", "g2.jsonl", '{"question": "q", "answer": "#### 1"}\n\n{"answer": "#### 2"}\n', 3, "question"),
    ("gsm8k", "g3.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": \n', 2, None),
    ("gsm8k_aug", "a.txt", "q1||<<1+1=2>> #### 2\nq2 <<1+1=2>> #### 2\n", 2, "question||steps"),
    ("gsm8k_aug", "a2.txt", "q1||<<1+1=2>> #### 2\nq2||<<1+1=2>> #### two\n", 2, "answer"),
    ("svamp", "s.json", '[\n {"ID": "a", "Body": "b", "Question": "q", "Answer": 1.0},\n'
                        ' {"ID": "b", "Body": "b", "Question": "q",\n  "Answer": "many"}\n]', 3, "Answer"),
    ("prontoqa", "p.json", '[{"question": "q", "answer": "True", "steps": []},\n'
                           ' {"question": "q", "answer": "Maybe", "steps": []}]', 2, "answer"),
    ("prosqa", "pr.json", '[{"question": "q", "answer": "A is a b.", "steps": "x"},\n {"question": 3}]',
     2, "question"),
    ("prosqa", "trunc.json", '[{"question": "q", "answer": "A is a b.", "steps": []},\n {"question": "q", ', 2, None),
    ("commonsenseqa", "c.jsonl", '{"id": "1", "question": {"stem": "s", "choices": '
                                 '[{"label": "A", "text": "x"}, {"label": "B", "text": "y"}]}, "answerKey": "C"}\n',
     1, "answerKey"),
    ("strategyqa", "t.json", '{"name": "strategyqa",\n "examples": [\n  {"input": "q", "target_scores": '
                             '{"Yes": 1, "No": 0}},\n  {"input": "q", "target_scores": {"Yes": 0, "No": 0}}\n ]\n}',
     4, "target_scores"),
    ("strategyqa", "t2.json", '{"name": "strategyqa"}', 1, "examples"),
    ("aqua", "q.json", '{"question": "q", "options": ["A)1", "B)2"], "correct": "A"}\n'
                       '{"question": "q", "options": ["1", "2"], "correct": "A"}\n', 2, "options"),
    ("multiarith", "m.json", '[{"sQuestion": "q", "lSolutions": [1]},\n{"sQuestion": "q", "lSolutions": []}]',
     2, "lSolutions"),
])
def test_malformed_files_name_file_line_and_field(tmp_path, name, filename, text, line, field):
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(BenchmarkFormatError) as err:
        load_benchmark(name, path)
    e = err.value
    assert (e.path, e.line, e.field) == (str(path), line, field)
    assert str(e).startswith(f"{path}:{line}: ") and (field is None or f"field {field!r}" in str(e))


@needs_data
def test_commonsenseqa_test_split_without_answers_is_refused():
    path = DATA / "commonsenseqa" / "test_rand_split_no_answers.jsonl"
    with pytest.raises(BenchmarkFormatError, match=r"no_answers\.jsonl:1: field 'answerKey': missing"):
        load_benchmark("commonsenseqa", path)


def test_hugging_face_rows_use_the_same_converters(monkeypatch):
    import datasets

    rows = [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows)
    bench = load_benchmark("gsm8k", "hf")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert [i.gold for i in bench.instances] == ["2", "4"]
    assert bench.instances[0].source == "hf:openai/gsm8k:main:test[0]"


def test_benchmark_specs():
    assert parse_benchmark_specs(["gsm8k,svamp=/x.json", "csqa"]) == [
        ("gsm8k", None), ("svamp", "/x.json"), ("commonsenseqa", None)]
    assert "multiarith" not in dict(parse_benchmark_specs(["all"]))
    with pytest.raises(ValueError, match="unknown benchmark"):
        parse_benchmark_specs(["gsm9k"])
    with pytest.raises(ValueError, match="given twice"):
        parse_benchmark_specs(["gsm8k", "gsm8k=/y"])
