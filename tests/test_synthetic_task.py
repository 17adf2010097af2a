"""The synthetic chained-arithmetic task: disjoint seeded splits, correct answers, parseable steps."""
import re

import pytest

from pipeline.data.readers import read_gsm8k_aug
from pipeline.data.synthetic import TASKS, TaskSpec, generate, write_task

STEP = re.compile(r"^<<(\d+)([-+*/])(\d+)=(\d+)>>$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


@pytest.fixture(scope="module", params=sorted(TASKS))
def splits(request):
    return request.param, generate(TaskSpec(task=request.param, train=3000, valid=200, test=200, seed=3))


def test_split_sizes_and_disjoint_problems(splits):
    _, s = splits
    assert [len(s[k]) for k in ("train", "valid", "test")] == [3000, 200, 200]
    keys = {k: {p.key for p in s[k]} for k in s}
    texts = {k: {p.question for p in s[k]} for k in s}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not keys[a] & keys[b], f"{a} and {b} share a problem"
        assert not texts[a] & texts[b], f"{a} and {b} share a question"
    assert len(keys["train"]) == 3000                     # no duplicates inside a split either


def test_steps_chain_and_answers_are_correct(splits):
    _, s = splits
    for p in s["train"] + s["test"]:
        assert 3 <= len(p.steps) <= 5
        value = None
        for step in p.steps:
            m = STEP.match(step)
            assert m, step
            a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
            assert OPS[op](a, b) == result, step
            assert value is None or a == value, f"step {step} does not continue from {value}"
            assert 1 <= result <= 30
            value = result
        assert p.answer == value
        # every operand the steps use is written in the question
        for step in p.steps:
            b = STEP.match(step)[3]
            assert b in p.question or STEP.match(step)[2] == "*", (b, p.question)


def test_same_seed_same_data_and_other_seed_other_data():
    a = generate(TaskSpec(train=200, valid=20, test=20, seed=1))
    b = generate(TaskSpec(train=200, valid=20, test=20, seed=1))
    c = generate(TaskSpec(train=200, valid=20, test=20, seed=2))
    assert [p.line() for p in a["test"]] == [p.line() for p in b["test"]]
    assert [p.line() for p in a["test"]] != [p.line() for p in c["test"]]
    # growing the train split leaves valid/test unchanged
    d = generate(TaskSpec(train=400, valid=20, test=20, seed=1))
    assert [p.line() for p in d["test"]] == [p.line() for p in a["test"]]


def test_written_files_parse_with_the_gsm8k_aug_reader(tmp_path):
    write_task(TaskSpec(train=50, valid=10, test=10, seed=0), tmp_path)
    for split, n in (("train", 50), ("valid", 10), ("test", 10)):
        result = read_gsm8k_aug(tmp_path / f"{split}.txt")
        assert len(result.examples) == n and not result.skipped
        ex = result.examples[0]
        assert ex.steps and all(STEP.match(s) for s in ex.steps)
        assert int(ex.answer) == int(STEP.match(ex.steps[-1])[4])
    assert (tmp_path / "task.json").is_file()


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown 'nope'"):
        generate(TaskSpec(task="nope"))
