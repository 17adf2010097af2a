"""The one normalised training/evaluation record, and step parsing.

Every reader in :mod:`pipeline.data.readers` turns its format into :class:`Example`, so method
collators and the evaluation code never see a dataset's own field names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DataFormatError",
    "Example",
    "normalize_numeric_answer",
    "parse_calculator_steps",
    "strip_calculator_annotations",
]

# A GSM8K calculator annotation: "<<48/2=24>>". Non-greedy and single-line so that two
# annotations on one line stay two steps, and a stray "<<" never swallows the rest of the text.
_CALC_RE = re.compile(r"<<[^\n]*?>>")

# "1,000" / "-1,234.5": only numbers written with thousands separators get their commas removed;
# an answer such as "Yes, it is" is left alone.
_NUMBER_WITH_COMMAS_RE = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")


@dataclass(frozen=True)
class Example:
    """One normalised example.

    Attributes:
        question: the question text, as in the source (callers apply ``.strip()``).
        steps: the reasoning steps; for GSM8K-like data one ``<<expr=result>>`` annotation each.
        answer: the final answer as a string (numbers without thousands separators).
        source_id: where it came from, so any example can be traced back: ``"gsm8k/train.jsonl:17"``
            (parent folder/file name + 1-based line), ``"prosqa/prosqa_test.json[3]"`` (0-based
            record index of a JSON list) or ``"hf:name:split:index"``.
        nl_steps: natural-language reasoning lines when the source has them (GSM8K answers);
            used for NL / explicit-CoT training. Empty when the source has none.
    """

    question: str
    steps: tuple[str, ...]
    answer: str
    source_id: str
    nl_steps: tuple[str, ...] = ()


class DataFormatError(ValueError):
    """A malformed line or record. The message names the file, the line/record and the field.

    ``where`` is the location prefix (``"gsm8k_aug/test.txt:12"``), ``field`` the offending
    field (or ``None`` when the whole line is unreadable), ``reason`` the bare explanation.
    """

    def __init__(self, where: str, reason: str, field: str | None = None) -> None:
        self.where = where
        self.field = field
        self.reason = reason
        super().__init__(f"{where}: {reason}")


def parse_calculator_steps(text: str) -> list[str]:
    """Return the ``<<…>>`` calculator annotations of ``text`` in order, brackets included.

    >>> parse_calculator_steps("Natalia sold 48/2 = <<48/2=24>>24 clips. <<48+24=72>>72")
    ['<<48/2=24>>', '<<48+24=72>>']
    """
    return _CALC_RE.findall(text)


def strip_calculator_annotations(text: str) -> str:
    """Remove ``<<…>>`` annotations, leaving the natural-language sentence.

    >>> strip_calculator_annotations("Natalia sold 48/2 = <<48/2=24>>24 clips in May.")
    'Natalia sold 48/2 = 24 clips in May.'
    """
    return _CALC_RE.sub("", text)


def normalize_numeric_answer(answer: str) -> str:
    """Strip surrounding whitespace and thousands separators from a numeric answer.

    GSM8K writes "1,000"; the models are trained (and answers parsed) without commas, as in the
    CODI reference preprocessing. Non-numeric answers are only stripped.

    >>> normalize_numeric_answer(" 1,450,000 ")
    '1450000'
    >>> normalize_numeric_answer("Yes, it is")
    'Yes, it is'
    """
    answer = answer.strip()
    if _NUMBER_WITH_COMMAS_RE.match(answer):
        return answer.replace(",", "")
    return answer
