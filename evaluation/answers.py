"""Answer extraction and comparison, in a strict and a flexible mode (lm-evaluation-harness style).

Every method is trained to end with ``ANSWER_PREFIX + answer`` (docs/DESIGN.md), so one parser
serves all of them:

- **strict** reads only a marked answer: the text after the last ``"The answer is:"``, after
  ``####``, or inside ``\\boxed{…}``.
- **flexible** also accepts an unmarked answer: the last number in the text (numeric), the last
  option letter (choice), the last True/False/Yes/No (bool), the candidate entity named last
  (ProsQA).

Both modes return a normalised prediction string (``None`` when nothing was found); ``is_correct``
compares it with an instance's gold answer: numbers with a relative tolerance (GSM-Hard targets are
floats), letters exactly, booleans by meaning (``True`` = ``Yes``), ProsQA sentences normalised.

>>> from evaluation.benchmarks import Instance
>>> inst = Instance(id="x", question="q", gold="1234.5", kind="numeric")
>>> score("So she pays $1,234.50 in total.\\nThe answer is: 1234.5", inst)["correct_strict"]
True
"""
from __future__ import annotations

import math
import re
from collections import Counter
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from evaluation.benchmarks import Instance

__all__ = [
    "ANSWER_PREFIX", "MODES", "parse_number", "extract_numbers", "numbers_match", "extract",
    "is_correct", "score", "majority_vote", "normalise_sentence",
]

ANSWER_PREFIX = "The answer is: "
MODES = ("strict", "flexible")
REL_TOL = 1e-4
ABS_TOL = 1e-12     # only matters for gold 0; GSM-Hard has targets like 2e-06

# The marked-answer cues. "answer is" also matches "The answer is", "the final answer is", ...
_PREFIX_RE = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)
_HASHES_RE = re.compile(r"####")

# A number as people write it: optional sign (not the hyphen of "3-4" or "well-known"), optional
# currency, digits with optional thousands separators, optional decimals, optional "/denominator".
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>[-+\u2212]))?\s?[$\u20ac\u00a3]?\s?"
    r"(?P<num>(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+(?![\d.]))?)"
    r"(?:/(?P<den>\d+(?:\.\d+)?)(?![\d/]))?"
)
_FRAC_LATEX_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}
_BOOL_RE = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)


# --------------------------------------------------------------------------- numbers
def parse_number(text: str) -> float | None:
    """The first number in ``text`` as a float, or None.

    >>> [parse_number(s) for s in ["$1,234.50", "-3", "12 dollars", "3/4", "\\u22122.5", "x"]]
    [1234.5, -3.0, 12.0, 0.75, -2.5, None]
    """
    nums = extract_numbers(text)
    return nums[0] if nums else None


def extract_numbers(text: str) -> list[float]:
    """Every number in ``text``, in order (see :data:`_NUMBER_RE` for what counts)."""
    text = _FRAC_LATEX_RE.sub(r"\1/\2", text)
    out = []
    for m in _NUMBER_RE.finditer(text):
        value = float(m.group("num").replace(",", ""))
        den = m.group("den")
        if den is not None and float(den) != 0:
            value /= float(den)
        if m.group("sign") in ("-", "\u2212"):
            value = -value
        out.append(value)
    return out


def format_number(value: float) -> str:
    """Canonical positional string: ``8.0`` → ``"8"``, ``2.0107e-06`` → ``"0.0000020107"``.

    Shortest round-trip digits (``repr``), never scientific notation, so the text a model would
    write and the gold answer look alike.
    """
    if not math.isfinite(value):
        return repr(value)
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def numbers_match(pred: float | str | None, gold: float | str, rel_tol: float = REL_TOL) -> bool:
    """Numeric equality with a relative tolerance (and a tiny absolute one for gold 0)."""
    if pred is None:
        return False
    p = parse_number(pred) if isinstance(pred, str) else pred
    g = parse_number(gold) if isinstance(gold, str) else gold
    if p is None or g is None:
        return False
    return math.isclose(p, g, rel_tol=rel_tol, abs_tol=ABS_TOL)


# --------------------------------------------------------------------------- marked answers
def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{…}`` (balanced braces)."""
    out, start = [], 0
    while (i := text.find("\\boxed{", start)) >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        out.append(text[i + len("\\boxed{"): j - 1 if depth == 0 else j])
        start = j
    return out


def marked_answer(text: str) -> str | None:
    """The text of the last marked answer: after "The answer is:" / "####", or a boxed answer.

    Whichever marker comes last in the text wins; the answer runs to the end of its line.
    """
    candidates: list[tuple[int, str]] = []
    for rx in (_PREFIX_RE, _HASHES_RE):
        ms = list(rx.finditer(text))
        if ms:
            rest = text[ms[-1].end():].lstrip(" \t")
            candidates.append((ms[-1].start(), rest.split("\n", 1)[0] if rest.strip() else ""))
    boxed = _boxed_contents(text)
    if boxed:
        candidates.append((text.rfind("\\boxed{"), boxed[-1]))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1].strip()


# --------------------------------------------------------------------------- per kind
def _extract_numeric(text: str, mode: str) -> str | None:
    if mode == "strict":
        marked = marked_answer(text)
        value = parse_number(marked) if marked is not None else None
    else:
        nums = extract_numbers(text)
        value = nums[-1] if nums else None
    return None if value is None else format_number(value)


def _choice_labels(inst: Instance) -> list[str]:
    return [chr(ord("A") + i) for i in range(len(inst.choices or []))] or list("ABCDE")


def _letter_in(segment: str, labels: list[str], last: bool) -> str | None:
    """A label written as "(B)", "B)", "B." or a bare "B" (not the article in "A car")."""
    cls = "".join(labels)
    patterns = [rf"\(([{cls}])\)", rf"\b([{cls}])\)", rf"\b([{cls}])\b(?!\s+[a-z])(?!['\-])"]
    for pat in patterns:
        found = re.findall(pat, segment)
        if found:
            return found[-1] if last else found[0]
    return None


def _extract_choice(text: str, inst: Instance, mode: str) -> str | None:
    labels = _choice_labels(inst)
    marked = marked_answer(text)
    if marked is not None:
        letter = _letter_in(marked, labels, last=False)
        if letter or mode == "strict":
            return letter
    if mode == "strict":
        return None
    letter = _letter_in(text, labels, last=True)
    if letter:
        return letter
    # No letter at all: the option whose text is named last.
    lowered, best = text.lower(), (-1, None)
    for label, choice in zip(labels, inst.choices or []):
        pos = lowered.rfind(choice.lower().strip()) if choice.strip() else -1
        if pos > best[0]:
            best = (pos, label)
    return best[1]


def _extract_bool(text: str, mode: str) -> str | None:
    segment = marked_answer(text) if mode == "strict" else text
    if segment is None:
        return None
    words = _BOOL_RE.findall(segment)
    if not words:
        return None
    word = words[0] if mode == "strict" else words[-1]
    return "True" if _BOOL_WORDS[word.lower()] else "False"


def normalise_sentence(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: "Tom is a wumpus." -> "tom is a wumpus"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _extract_prosqa(text: str, inst: Instance, mode: str) -> str | None:
    if mode == "strict":
        marked = marked_answer(text)
        return (normalise_sentence(marked) or None) if marked is not None else None
    # Flexible: the candidate entity (from "Is X a A or B?") that the text names last.
    words = normalise_sentence(text).split()
    candidates = [c.lower() for c in (inst.choices or [])]
    for word in reversed(words):
        if not candidates or word in candidates:
            return word
    return None


def extract(text: str, inst: Instance, mode: str = "flexible") -> str | None:
    """The normalised prediction of ``text`` for ``inst`` in ``mode`` ("strict" or "flexible")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if inst.kind == "numeric":
        return _extract_numeric(text, mode)
    if inst.kind == "choice":
        return _extract_choice(text, inst, mode)
    if inst.kind == "bool":
        return _extract_bool(text, mode)
    if inst.kind == "prosqa":
        return _extract_prosqa(text, inst, mode)
    raise ValueError(f"unknown answer kind {inst.kind!r}")


def is_correct(pred: str | None, inst: Instance, mode: str = "flexible") -> bool:
    """Compare an extracted prediction with ``inst.gold``."""
    if pred is None:
        return False
    if inst.kind == "numeric":
        return numbers_match(pred, inst.gold)
    if inst.kind == "choice":
        return pred.strip().upper() == inst.gold.strip().upper()
    if inst.kind == "bool":
        return _BOOL_WORDS.get(pred.strip().lower()) == _BOOL_WORDS.get(inst.gold.strip().lower())
    if inst.kind == "prosqa":
        gold = normalise_sentence(inst.gold)
        if mode == "strict":
            return pred == gold
        return bool(gold) and pred == gold.split()[-1]
    raise ValueError(f"unknown answer kind {inst.kind!r}")


def majority_vote(texts: list[str], inst: Instance, mode: str = "flexible") -> str | None:
    """Self-consistency: the most frequent extracted answer (ties: first seen); None if none parse."""
    preds = [p for p in (extract(t, inst, mode) for t in texts) if p is not None]
    if not preds:
        return None
    counts = Counter(preds)
    top = max(counts.values())
    return next(p for p in preds if counts[p] == top)


def score(text: str, inst: Instance, samples: list[str] | None = None) -> dict:
    """Predictions and correctness in both modes; with ``samples``, a majority vote over them."""
    out = {}
    for mode in MODES:
        pred = majority_vote(samples, inst, mode) if samples else extract(text, inst, mode)
        out[f"prediction_{mode}"] = pred
        out[f"correct_{mode}"] = is_correct(pred, inst, mode)
    return out
