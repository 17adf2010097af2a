"""Answer extraction and comparison: numbers, letters, booleans, ProsQA sentences; strict vs flexible."""
import pytest

from evaluation.answers import (
    extract,
    extract_numbers,
    is_correct,
    majority_vote,
    marked_answer,
    numbers_match,
    parse_number,
    score,
)
from evaluation.benchmarks import Instance


def num(gold):
    return Instance(id="n", question="q", gold=gold, kind="numeric")


CHOICE = Instance(id="c", question="q", gold="C", kind="choice", choices=("bank", "library", "mall", "park", "zoo"))
BOOL_TF = Instance(id="b", question="q", gold="False", kind="bool", choices=("True", "False"))
BOOL_YN = Instance(id="y", question="q", gold="Yes", kind="bool", choices=("Yes", "No"))
PROSQA = Instance(id="p", question="… Is Tom a wumpus or zumpus?", gold="Tom is a wumpus.", kind="prosqa",
                  choices=("wumpus", "zumpus"))


@pytest.mark.parametrize("text, value", [
    ("$1,234.50", 1234.5), ("-3", -3.0), ("12 dollars", 12.0), ("3/4", 0.75), ("\u22122.5", -2.5),
    ("costs $ 5", 5.0), ("-$7", -7.0), ("50%", 50.0), (".5", 0.5), ("\\frac{3}{4}", 0.75), ("none", None),
    ("1,000,000 people", 1_000_000.0),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_hyphen_is_not_a_sign_and_sentence_period_is_not_a_decimal():
    assert extract_numbers("pages 3-4 of 10.") == [3.0, 4.0, 10.0]
    assert extract_numbers("well-known 5") == [5.0]


@pytest.mark.parametrize("text, strict, flexible", [
    ("48/2=24 so 72 in all.\nThe answer is: 72", "72", "72"),
    ("The answer is: $1,234.50.", "1234.5", "1234.5"),
    ("She has 3 apples and 4 pears, 7 in total.", None, "7"),
    ("steps\n#### 18", "18", "18"),
    ("so \\boxed{\\frac{1}{4}} is it", "0.25", "0.25"),    # LaTeX fractions are numbers
    ("The answer is: 5 apples, since 2 + 3", "5", "3"),
    ("the final answer is -12", "-12", "-12"),
    ("The answer is: \n", None, None),
])
def test_numeric_strict_and_flexible(text, strict, flexible):
    inst = num(strict or flexible or "0")
    assert extract(text, inst, "strict") == strict
    assert extract(text, inst, "flexible") == flexible


def test_numbers_compare_with_relative_tolerance():
    assert numbers_match("2.6666", "2.6666666666666665")        # GSM-Hard float target
    assert not numbers_match("2.67", "2.6666666666666665")
    assert numbers_match("-9867630", "-9867630.0")
    assert numbers_match("0", "0") and not numbers_match("0.01", "0")
    assert is_correct("1000000.00004", num("1000000"))
    assert not is_correct(None, num("1"))


def test_marked_answer_takes_the_last_marker():
    assert marked_answer("The answer is: 3\n... actually #### 4") == "4"
    assert marked_answer("no marker") is None


@pytest.mark.parametrize("text, strict, flexible", [
    ("The answer is: C", "C", "C"),
    ("The answer is: (C) mall", "C", "C"),
    ("I pick (B).", None, "B"),
    ("A mall is a place. So C.", None, "C"),             # the article "A" is not an answer
    ("It must be the mall.", None, "C"),                # option text, no letter
    ("The answer is: mall", None, "C"),
])
def test_choice_letters(text, strict, flexible):
    assert extract(text, CHOICE, "strict") == strict
    assert extract(text, CHOICE, "flexible") == flexible


def test_booleans_true_false_and_yes_no():
    assert score("The answer is: False", BOOL_TF)["correct_strict"]
    assert extract("Is it true? It is false.", BOOL_TF, "flexible") == "False"
    assert extract("Is it true? It is false.", BOOL_TF, "strict") is None
    assert score("The answer is: Yes.", BOOL_YN) == {"prediction_strict": "True", "correct_strict": True,
                                                     "prediction_flexible": "True", "correct_flexible": True}
    assert not score("The answer is: No", BOOL_YN)["correct_flexible"]
    assert is_correct("True", BOOL_YN) and not is_correct("True", BOOL_TF)


def test_prosqa_sentence_strict_and_final_entity_flexible():
    assert score("Tom is a zumpus.\nThe answer is: Tom is a wumpus.", PROSQA)["correct_strict"]
    assert score("The answer is: tom  is a WUMPUS", PROSQA)["correct_strict"]       # normalised
    s = score("Every zumpus is a wumpus. Tom is a wumpus.", PROSQA)
    assert not s["correct_strict"] and s["correct_flexible"]
    assert not score("Tom is a wumpus. Tom is a zumpus.", PROSQA)["correct_flexible"]


def test_majority_vote():
    texts = ["The answer is: 3", "The answer is: 4", "4", "The answer is: 3.0", "noise"]
    assert majority_vote(texts, num("3")) == "3"              # 3, 3.0 → "3" twice; 4 twice; first wins
    assert majority_vote(["x", "y"], num("3")) is None
    assert score("", num("4"), samples=["4", "The answer is: 4", "5"])["correct_flexible"]


def test_scientific_notation_and_positional_gold():
    from evaluation.answers import format_number

    assert parse_number("2.0107e-06") == 2.0107e-06 and parse_number("3e5 units") == 3e5
    assert format_number(2.0107e-06) == "0.0000020107" and format_number(8.0) == "8"
    assert format_number(-2.5) == "-2.5" and format_number(1e20) == "100000000000000000000"
    assert not numbers_match("0", "0.0000020107")              # tiny targets need the relative test
