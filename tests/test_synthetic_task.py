"""The synthetic chained-arithmetic task: disjoint seeded splits, correct answers, parseable steps."""
import re

import pytest

from pipeline.data.readers import read_gsm8k_aug
from pipeline.data.synthetic import SHAPES, TASKS, TaskSpec, generate, write_task

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
    task, s = splits
    shape = SHAPES[task]
    for p in s["train"] + s["test"]:
        assert shape.min_steps <= len(p.steps) <= shape.max_steps
        value = None
        for step in p.steps:
            m = STEP.match(step)
            assert m, step
            a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
            assert OPS[op](a, b) == result, step
            assert value is None or a == value, f"step {step} does not continue from {value}"
            assert 1 <= result <= shape.cap
            value = result
        assert p.answer == value
        # every operand the steps use is written in the question
        for step in p.steps:
            b = STEP.match(step)[3]
            assert b in p.question or STEP.match(step)[2] in "*/", (b, p.question)


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


def test_stock_is_another_task_not_chain_reworded():
    """Issue 13's held-out task: other step counts, operations and wording than the study's task."""
    chain = generate(TaskSpec(task="chain", train=2000, valid=10, test=10))["train"]
    stock = generate(TaskSpec(task="stock", train=2000, valid=10, test=10))["train"]
    assert {len(p.steps) for p in stock} == set(range(2, 7))
    ops = {STEP.match(step)[2] for p in stock for step in p.steps}
    assert ops == {"+", "-", "*", "/"} and "/" not in {STEP.match(st)[2] for p in chain for st in p.steps}
    assert max(int(STEP.match(st)[3]) for p in stock for st in p.steps if STEP.match(st)[2] in "+-") == 12

    def sentences(problems):
        return {re.sub(r"\d+", "N", x) for p in problems for x in p.question.split(". ")}
    assert not sentences(chain) & sentences(stock)
