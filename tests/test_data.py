"""Tests for pipeline.data: readers (real files and fixtures), errors, filters, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data import (
    FORMATS,
    DataFormatError,
    Example,
    apply_filters,
    epoch_shard,
    normalize_numeric_answer,
    parse_calculator_steps,
    read_gsm8k,
    read_gsm8k_aug,
    read_hf,
    read_prontoqa,
    read_prosqa,
    read_source,
    shard,
    shuffled_indices,
    strip_calculator_annotations,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BAD = FIXTURES / "bad"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real datasets not present at {SHARED} (../shared/data)"
)


# --------------------------------------------------------------------------- step parsing

def test_parse_calculator_steps_in_order():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nThen 48+24 = <<48+24=72>>72. #### 72"
    assert parse_calculator_steps(text) == ["<<48/2=24>>", "<<48+24=72>>"]
    assert parse_calculator_steps("no steps here") == []
    # Two annotations back to back stay two steps (non-greedy match).
    assert parse_calculator_steps("<<1+1=2>><<2*3=6>>") == ["<<1+1=2>>", "<<2*3=6>>"]
    assert strip_calculator_annotations("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


def test_normalize_numeric_answer():
    assert normalize_numeric_answer(" 1,450,000 ") == "1450000"
    assert normalize_numeric_answer("-1,234.5") == "-1234.5"
    assert normalize_numeric_answer("18") == "18"
    assert normalize_numeric_answer("Yes, it is") == "Yes, it is"


# --------------------------------------------------------------------------- real data

@needs_shared
def test_real_gsm8k_aug_test():
    res = read_gsm8k_aug(SHARED / "gsm8k_aug" / "test.txt")
    assert len(res.examples) == 1319 and res.skipped == []
    first = res.examples[0]
    assert first.answer == "18"
    assert first.steps == ("<<16-3-4=9>>", "<<9*2=18>>")
    assert first.question.startswith("Janet’s ducks lay 16 eggs")
    assert first.source_id == "gsm8k_aug/test.txt:1"
    assert all("," not in ex.answer for ex in res.examples)  # "2,125" is read as "2125"


@needs_shared
def test_real_gsm8k_train_and_test_match_aug():
    train = read_gsm8k(SHARED / "gsm8k" / "train.jsonl")
    assert len(train.examples) == 7473 and train.skipped == []
    ex = train.examples[0]
    assert ex.steps == ("<<48/2=24>>", "<<48+24=72>>") and ex.answer == "72"
    assert ex.nl_steps == (
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    )
    assert ex.source_id == "gsm8k/train.jsonl:1"
    # The shared README checked that gsm8k_aug/test.txt is GSM8K test in the same order; our
    # derivation of steps from GSM8K must agree with the published aug steps too.
    test = read_source("gsm8k", SHARED / "gsm8k", split="test").examples
    aug = read_source("gsm8k_aug", SHARED / "gsm8k_aug", split="test").examples
    assert [e.answer for e in test] == [e.answer for e in aug]
    assert [e.steps for e in test] == [e.steps for e in aug]


@needs_shared
def test_real_prosqa_and_prontoqa():
    prosqa = read_prosqa(SHARED / "prosqa" / "prosqa_test.json")
    assert len(prosqa.examples) == 500
    assert prosqa.examples[0].steps[0] == "Sally is a scrompus."
    assert prosqa.examples[0].source_id == "prosqa/prosqa_test.json[0]"
    pronto = read_source("prontoqa", SHARED / "prontoqa", split="test")
    assert len(pronto.examples) == 800
    assert {e.answer for e in pronto.examples} == {"True", "False"}


# --------------------------------------------------------------------------- fixtures

def test_fixture_gsm8k_aug_train_is_derived_from_gsm8k():
    aug = read_gsm8k_aug(FIXTURES / "gsm8k_aug_train.txt").examples
    assert len(aug) == 400 and all(ex.steps for ex in aug)
    # The first fixture lines come from the shipped gsm8k_train.jsonl slice, through read_gsm8k.
    gsm = [ex for ex in read_gsm8k(FIXTURES / "gsm8k_train.jsonl").examples if ex.steps]
    for a, g in zip(aug, gsm):
        assert (a.question, a.steps, a.answer) == (g.question, g.steps, g.answer)


def test_fixture_slices_and_max_examples():
    assert len(read_gsm8k_aug(FIXTURES / "gsm8k_aug_test.txt").examples) == 50
    assert len(read_prosqa(FIXTURES / "prosqa_small.json").examples) == 10
    assert len(read_prontoqa(FIXTURES / "prontoqa_small.json").examples) == 10
    res = read_source("gsm8k", FIXTURES / "gsm8k_train.jsonl", max_examples=3)
    assert [e.source_id for e in res.examples] == [f"fixtures/gsm8k_train.jsonl:{i}" for i in (1, 2, 3)]
    assert read_source("prosqa", FIXTURES / "prosqa_small.json", max_examples=0).examples == []


def test_read_source_rejects_unknown_format():
    with pytest.raises(ValueError) as err:
        read_source("csv", FIXTURES / "gsm8k_train.jsonl")
    for fmt in FORMATS:
        assert fmt in str(err.value)
    with pytest.raises(ValueError, match="on_malformed"):
        read_gsm8k(FIXTURES / "gsm8k_train.jsonl", on_malformed="ignore")


# --------------------------------------------------------------------------- malformed input

def test_error_names_file_line_and_field(tmp_path):
    # Reproduce a broken line 12 in a file laid out like the real one.
    lines = (FIXTURES / "gsm8k_aug_test.txt").read_text(encoding="utf-8").splitlines()[:11]
    lines.append("How many?||<<2+2=4>> 4")
    path = tmp_path / "gsm8k_aug" / "test.txt"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        read_gsm8k_aug(path)
    assert str(err.value) == "gsm8k_aug/test.txt:12: field 'answer': missing '####' before the answer"
    assert err.value.field == "answer"


def test_gsm8k_aug_bad_lines_error_and_skip():
    with pytest.raises(DataFormatError, match=r"bad/gsm8k_aug_bad\.txt:2: missing '\|\|'"):
        read_gsm8k_aug(BAD / "gsm8k_aug_bad.txt")
    res = read_gsm8k_aug(BAD / "gsm8k_aug_bad.txt", on_malformed="skip")
    assert len(res.examples) == 3 and res.n_skipped == 3
    assert [m.split(":")[1] for m in res.skipped] == ["2", "4", "5"]
    assert "empty answer" in res.skipped[2]
    assert res.examples[-1].answer == "1000"


def test_gsm8k_bad_records_skip_messages():
    with pytest.raises(DataFormatError, match=r"gsm8k_bad\.jsonl:2: invalid JSON"):
        read_gsm8k(BAD / "gsm8k_bad.jsonl")
    res = read_gsm8k(BAD / "gsm8k_bad.jsonl", on_malformed="skip")
    assert len(res.examples) == 2
    expected = [
        ":2: invalid JSON",
        ":3: missing field 'answer'",
        ":4: field 'question' must be a string, got int",
        ":5: field 'answer': missing '####'",
        ":7: expected a JSON object, got list",
    ]
    assert len(res.skipped) == len(expected)
    for msg, part in zip(res.skipped, expected):
        assert msg.startswith("bad/gsm8k_bad.jsonl") and part in msg


def test_json_list_bad_records():
    with pytest.raises(DataFormatError, match=r"prosqa_bad\.json\[1\]: missing field 'steps'"):
        read_prosqa(BAD / "prosqa_bad.json")
    res = read_prosqa(BAD / "prosqa_bad.json", on_malformed="skip")
    assert len(res.examples) == 2 and res.n_skipped == 3
    assert "[2]: field 'steps' must be a list of strings" in res.skipped[1]
    assert "[3]: field 'answer' must be a string, got bool" in res.skipped[2]
    # A file that is not a JSON list, or not JSON at all, has nothing to skip to: always raises.
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        read_prontoqa(BAD / "not_a_list.json", on_malformed="skip")
    with pytest.raises(DataFormatError, match=r"truncated\.json:\d+: invalid JSON"):
        read_prosqa(BAD / "truncated.json", on_malformed="skip")


# --------------------------------------------------------------------------- Hugging Face

def test_hf_reader_local_dataset_dirs(tmp_path):
    datasets = pytest.importorskip("datasets")
    steps_records = [
        {"question": "Q1?", "steps": ["<<1+1=2>>"], "answer": "2"},
        {"question": "Q2?", "steps": ["a", "b"], "answer": "1,000"},
    ]
    cot_records = [{"question": "Q3?", "cot": "<<2*3=6>> <<6+1=7>>", "answer": "7"}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(steps_records),
         "test": datasets.Dataset.from_list(cot_records)}
    ).save_to_disk(str(tmp_path / "dd"))
    train = read_hf(tmp_path / "dd", split="train").examples
    assert [e.steps for e in train] == [("<<1+1=2>>",), ("a", "b")]
    assert train[1].answer == "1000" and train[0].source_id == "hf:dd:train:0"
    test = read_source("hf", tmp_path / "dd", split="test").examples
    assert test[0].steps == ("<<2*3=6>>", "<<6+1=7>>") and test[0].answer == "7"
    with pytest.raises(ValueError, match="no split 'valid'"):
        read_hf(tmp_path / "dd", split="valid")

    # GSM8K-style records (answer with ####), plus one without any reasoning field.
    gsm_records = [
        json.loads(line)
        for line in (FIXTURES / "gsm8k_train.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    ] + [{"question": "Q?", "answer": "5"}]
    datasets.Dataset.from_list(gsm_records).save_to_disk(str(tmp_path / "gsm"))
    res = read_hf(tmp_path / "gsm", on_malformed="skip")
    assert [e.answer for e in res.examples] == ["72", "10"]
    assert res.examples[0].steps == ("<<48/2=24>>", "<<48+24=72>>")
    assert res.skipped == [
        (
            "hf:gsm:train:2: no reasoning steps: expected a 'steps' list, a 'cot' string "
            "or a GSM8K-style 'answer' with '####'"
        )
    ]


# --------------------------------------------------------------------------- filters

def _ex(answer: str, steps: tuple[str, ...], i: int) -> Example:
    return Example(question=f"q{i}", steps=steps, answer=answer, source_id=f"t:{i}")


def test_filters_count_and_log():
    examples = [
        _ex("5", ("<<2+3=5>>",), 0),            # loses its only step, kept
        _ex("-10", ("<<1-11=-10>>", "x"), 1),   # negative answer: dropped
        _ex("12", ("a", "b", "c"), 2),          # too long: dropped
        _ex("7", (), 3),                        # no steps to drop, kept
        _ex("abc", ("a", "b"), 4),              # non-digit answer: dropped
    ]
    lines: list[str] = []
    kept, report = apply_filters(
        examples,
        drop_last_step=True,
        require_digit_answer=True,
        max_tokens=1,
        count_tokens=lambda ex: len(ex.steps),
        log=lines.append,
    )
    assert [e.source_id for e in kept] == ["t:0", "t:3"]
    assert kept[0].steps == ()
    assert report.last_step_dropped == 4 and report.left_without_steps == 2
    assert report.non_digit_answer == 2 and report.too_long == 1
    assert (report.n_in, report.n_out, report.n_dropped) == (5, 2, 3)
    assert len(lines) == 3
    assert "4 of 5" in lines[0] and "dropped 2 of 5" in lines[1] and "dropped 1 of 3" in lines[2]


def test_filters_off_still_log_and_validate():
    lines: list[str] = []
    examples = [_ex("1", ("a",), 0)]
    kept, report = apply_filters(examples, log=lines.append)
    assert kept == examples and report.n_dropped == 0
    assert lines == [
        "filter drop_last_step: off",
        "filter require_digit_answer: off",
        "filter max_tokens: off",
    ]
    with pytest.raises(ValueError, match="count_tokens"):
        apply_filters(examples, max_tokens=10, log=lines.append)


# --------------------------------------------------------------------------- sampling

def test_shuffled_indices_deterministic_and_per_epoch():
    a = shuffled_indices(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == shuffled_indices(50, seed=1, epoch=0)
    assert a != shuffled_indices(50, seed=1, epoch=1)
    assert a != shuffled_indices(50, seed=2, epoch=0)
    # (seed, epoch) pairs do not collide the way seed + epoch would.
    assert shuffled_indices(50, 0, 1) != shuffled_indices(50, 1, 0)


@pytest.mark.parametrize("n,world", [(12, 4), (10, 4), (3, 4), (7, 1)])
def test_shard_covers_and_balances(n, world):
    idx = shuffled_indices(n, seed=0, epoch=3)
    parts = [shard(idx, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # every rank the same count
    assert len(parts[0]) == -(-n // world)
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(n))  # every example seen
    extra = len(flat) - n
    assert extra < world
    if extra == 0:  # no padding needed: ranks are disjoint
        assert sorted(flat) == list(range(n))
    # Padding repeats the first indices of the permutation (wrap-around).
    assert sorted(flat) == sorted(idx + [idx[i % n] for i in range(extra)])


def test_shard_without_padding_and_errors():
    idx = list(range(10))
    parts = [shard(idx, r, 4, pad=False) for r in range(4)]
    assert [len(p) for p in parts] == [2, 2, 2, 2]
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == 8  # disjoint; the 2-item tail is dropped
    assert epoch_shard(10, 0, 0, 1, 4) == shard(shuffled_indices(10, 0, 0), 1, 4)
    with pytest.raises(ValueError):
        shard(idx, 4, 4)
    with pytest.raises(ValueError):
        shard(idx, 0, 0)
