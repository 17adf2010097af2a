"""Readers: one per on-disk format, each producing :class:`~pipeline.data.example.Example`.

All readers share one contract::

    read_X(path, *, on_malformed="error" | "skip", max_examples=None) -> ReadResult

A malformed line/record raises :class:`DataFormatError` naming file, line (1-based) or record
index (JSON lists, 0-based as in ``data[i]``) and field. With ``on_malformed="skip"`` it is skipped
instead and its message kept in ``ReadResult.skipped``, so a caller can always report how much
was lost (the project never drops data silently). Blank lines in line-based files are not
records and are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .example import (
    DataFormatError,
    Example,
    normalize_numeric_answer,
    parse_calculator_steps,
    strip_calculator_annotations,
)
from .views import socratic_solution_line

__all__ = [
    "FORMATS",
    "ReadResult",
    "read_gsm8k",
    "read_gsm8k_aug",
    "read_hf",
    "read_prontoqa",
    "read_prosqa",
    "read_source",
]

FORMATS: tuple[str, ...] = ("gsm8k_aug", "gsm8k", "prosqa", "prontoqa", "hf")
_ON_MALFORMED = ("error", "skip")

# When read_source is given a directory, the split picks the file, following the layout of
# ../shared/data (gsm8k/test.jsonl, gsm8k_aug/test.txt, prosqa/prosqa_test.json, ...).
_SPLIT_FILES = {
    "gsm8k_aug": "{split}.txt",
    "gsm8k": "{split}.jsonl",
    "prosqa": "prosqa_{split}.json",
    "prontoqa": "prontoqa_{split}.json",
}


@dataclass
class ReadResult:
    """What a reader returns: the examples, and one message per skipped line/record."""

    examples: list[Example]
    skipped: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


# --------------------------------------------------------------------------- helpers

def _display_name(path: Path) -> str:
    """``parent/name`` — enough to identify a file in messages and source ids."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


class _Collector:
    """Gathers examples, applying the on_malformed policy and the max_examples cap."""

    def __init__(self, on_malformed: str, max_examples: int | None) -> None:
        if on_malformed not in _ON_MALFORMED:
            raise ValueError(f"on_malformed must be one of {_ON_MALFORMED}, got {on_malformed!r}")
        if max_examples is not None and max_examples < 0:
            raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}")
        self.on_malformed = on_malformed
        self.max_examples = max_examples
        self.result = ReadResult(examples=[])

    @property
    def full(self) -> bool:
        return self.max_examples is not None and len(self.result.examples) >= self.max_examples

    def take(self, parse: Callable[..., Example], *args: Any) -> None:
        """Run ``parse(*args)``; keep its example, or handle its DataFormatError per the policy."""
        try:
            self.result.examples.append(parse(*args))
        except DataFormatError as err:
            if self.on_malformed == "error":
                raise
            self.result.skipped.append(str(err))


def _require(rec: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in rec or rec[key] is None:
        raise DataFormatError(where, f"missing field '{key}'", key)
    return rec[key]


def _require_str(rec: Mapping[str, Any], key: str, where: str) -> str:
    value = _require(rec, key, where)
    if not isinstance(value, str):
        raise DataFormatError(
            where, f"field '{key}' must be a string, got {type(value).__name__}", key
        )
    if not value.strip():
        raise DataFormatError(where, f"field '{key}' is empty", key)
    return value


def _require_str_list(rec: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = _require(rec, key, where)
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise DataFormatError(
            where, f"field '{key}' must be a list of strings, got {type(value).__name__}", key
        )
    return tuple(value)


def _as_object(rec: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(rec, Mapping):
        raise DataFormatError(where, f"expected a JSON object, got {type(rec).__name__}")
    return rec


def _split_final_answer(text: str, where: str, fld: str) -> tuple[str, str]:
    """Split ``"reasoning #### answer"`` at the last ``####``; return (reasoning, answer)."""
    reasoning, sep, answer = text.rpartition("####")
    if not sep:
        raise DataFormatError(where, f"field '{fld}': missing '####' before the answer", fld)
    answer = normalize_numeric_answer(answer)
    if not answer:
        raise DataFormatError(where, f"field '{fld}': empty answer after '####'", fld)
    return reasoning, answer


def _gsm8k_reasoning(reasoning: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """GSM8K answer body (plain or Socratic) → (calculator steps, natural-language lines).

    The NL lines drop the ``<<…>>`` markup (calculator tooling, kept in ``steps``) and a Socratic
    sub-question, so a file and its Socratic variant read alike (pipeline/data/views.py). Blank
    lines are not steps (a Socratic sub-question can sit over a blank solution line).
    """
    lines = [sol for sol in map(socratic_solution_line, reasoning.splitlines()) if sol.strip()]
    steps = tuple(step for line in lines for step in parse_calculator_steps(line))
    nl = tuple(" ".join(strip_calculator_annotations(line).split()) for line in lines)
    return steps, nl


def _free_text_steps(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Steps from a chain of thought: its ``<<…>>`` annotations when it has any, else its
    non-empty lines (natural-language CoT, e.g. GSM8k-Aug-NL), which also become ``nl_steps``."""
    calc = parse_calculator_steps(text)
    if calc:
        return tuple(calc), ()
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    return lines, lines


def _iter_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """Yield (1-based line number, line without newline) for non-blank lines; None for a line
    that is not UTF-8 (decoded per line, so the error names the line and skipping can go on)."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield lineno, None
                continue
            if line.strip():
                yield lineno, line


def _not_utf8(line: None, where: str) -> Example:
    raise DataFormatError(where, "not UTF-8 text")


# --------------------------------------------------------------------------- line formats

def _parse_gsm8k_aug_line(line: str, where: str) -> Example:
    question, sep, rest = line.partition("||")
    if not sep:
        raise DataFormatError(where, "missing '||' between question and steps", "question")
    if not question.strip():
        raise DataFormatError(where, "field 'question' is empty", "question")
    reasoning, answer = _split_final_answer(rest, where, "answer")
    steps, nl = _free_text_steps(reasoning)
    return Example(question=question, steps=steps, answer=answer, source_id=where, nl_steps=nl)


def _read_lines(path: str | Path, parse, on_malformed: str, max_examples: int | None) -> ReadResult:
    """One example per non-blank line; `parse(line, "file:line")` raises DataFormatError."""
    path = Path(path)
    name = _display_name(path)
    out = _Collector(on_malformed, max_examples)
    for lineno, line in _iter_lines(path):
        if out.full:
            break
        out.take(parse if line is not None else _not_utf8, line, f"{name}:{lineno}")
    return out.result


def read_gsm8k_aug(
    path: str | Path, *, on_malformed: str = "error", max_examples: int | None = None
) -> ReadResult:
    """Read GSM8k-Aug (iCoT) lines ``question||<<a>> <<b>> #### answer``.

    Steps are the ``<<…>>`` annotations in order; the answer loses thousands separators.
    """
    return _read_lines(path, _parse_gsm8k_aug_line, on_malformed, max_examples)


def _parse_gsm8k_record(rec: Any, where: str) -> Example:
    rec = _as_object(rec, where)
    question = _require_str(rec, "question", where)
    reasoning, answer = _split_final_answer(_require_str(rec, "answer", where), where, "answer")
    steps, nl = _gsm8k_reasoning(reasoning)
    return Example(question=question, steps=steps, answer=answer, source_id=where, nl_steps=nl)


def read_gsm8k(
    path: str | Path, *, on_malformed: str = "error", max_examples: int | None = None
) -> ReadResult:
    """Read GSM8K jsonl ``{"question", "answer"}`` (answer = NL lines, last line ``#### 72``).

    ``steps`` = the calculator annotations in order, which is how GSM8k-Aug-format training data
    is derived from the real GSM8K train split; ``nl_steps`` = the natural-language lines
    (without the ``####`` line and without the annotations). Answers lose thousands separators.
    """
    return _read_lines(path, _parse_gsm8k_line, on_malformed, max_examples)


def _parse_gsm8k_line(line: str, where: str) -> Example:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(where, f"invalid JSON ({err.msg} at column {err.colno})") from None
    return _parse_gsm8k_record(rec, where)


# --------------------------------------------------------------------------- JSON lists

def _parse_steps_record(rec: Any, where: str) -> Example:
    rec = _as_object(rec, where)
    return Example(
        question=_require_str(rec, "question", where),
        steps=_require_str_list(rec, "steps", where),
        answer=normalize_numeric_answer(_require_str(rec, "answer", where)),
        source_id=where,
    )


def _read_steps_json(path: str | Path, on_malformed: str, max_examples: int | None) -> ReadResult:
    """A JSON list of ``{"question", "steps": [...], "answer", ...}`` (Coconut's layout)."""
    path = Path(path)
    name = _display_name(path)
    out = _Collector(on_malformed, max_examples)
    # The file is one JSON document: if it does not parse there is nothing to skip to, so this
    # raises whatever on_malformed says.
    try:
        with path.open(encoding="utf-8") as fh:
            records = json.load(fh)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{name}:{err.lineno}", f"invalid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise DataFormatError(name, "not UTF-8 text") from None
    if not isinstance(records, list):
        raise DataFormatError(name, f"expected a JSON list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if out.full:
            break
        out.take(_parse_steps_record, rec, f"{name}[{i}]")
    return out.result


def read_prosqa(
    path: str | Path, *, on_malformed: str = "error", max_examples: int | None = None
) -> ReadResult:
    """Read ProsQA (Coconut): JSON list of ``{"question", "steps", "answer", ...}``."""
    return _read_steps_json(path, on_malformed, max_examples)


def read_prontoqa(
    path: str | Path, *, on_malformed: str = "error", max_examples: int | None = None
) -> ReadResult:
    """Read ProntoQA (Coconut's split): like ProsQA, answers ``"True"``/``"False"``."""
    return _read_steps_json(path, on_malformed, max_examples)


# --------------------------------------------------------------------------- Hugging Face

def _hf_answer(rec: Mapping[str, Any], where: str) -> str:
    value = _require(rec, "answer", where)
    # Hub datasets sometimes store numeric answers as numbers; 18.0 must read as "18".
    if isinstance(value, int):  # bool included: True -> "True"
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return normalize_numeric_answer(_require_str(rec, "answer", where))


def _parse_hf_record(rec: Any, where: str) -> Example:
    """Normalise a hub record by the fields it has (first match wins):
    a ``steps`` list; a ``cot`` string (``<<…>>`` annotations, else its lines); a GSM8K-style
    ``answer`` containing ``####``."""
    rec = _as_object(rec, where)
    question = _require_str(rec, "question", where)
    if rec.get("steps") is not None:
        steps, nl = _require_str_list(rec, "steps", where), ()
        answer = _hf_answer(rec, where)
    elif rec.get("cot") is not None:
        cot = rec["cot"]
        if not isinstance(cot, str):
            raise DataFormatError(where, f"field 'cot' must be a string, got {type(cot).__name__}", "cot")
        steps, nl = _free_text_steps(cot)
        answer = _hf_answer(rec, where)
        if "####" in answer:  # some copies keep the "#### 18" marker in the answer field
            answer = _split_final_answer(answer, where, "answer")[1]
    elif isinstance(rec.get("answer"), str) and "####" in rec["answer"]:
        reasoning, answer = _split_final_answer(rec["answer"], where, "answer")
        steps, nl = _gsm8k_reasoning(reasoning)
    else:
        raise DataFormatError(
            where,
            "no reasoning steps: expected a 'steps' list, a 'cot' string "
            "or a GSM8K-style 'answer' with '####'",
            "steps",
        )
    return Example(question=question, steps=steps, answer=answer, source_id=where, nl_steps=nl)


def _is_saved_dataset_dir(path: Path) -> bool:
    """True for a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any(
        (path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def read_hf(
    path: str | Path,
    *,
    split: str = "train",
    on_malformed: str = "error",
    max_examples: int | None = None,
    config: str | None = None,
) -> ReadResult:
    """Read a Hugging Face dataset: a ``save_to_disk`` directory, or anything
    ``datasets.load_dataset(path, config, split=split)`` accepts (hub name, local data folder);
    ``config`` names a hub configuration (``openai/gsm8k`` has ``main`` and ``socratic``).

    Records are normalised by their fields (see ``_parse_hf_record``). Source ids are
    ``hf:<name>:<split>:<0-based index>``.
    """
    import datasets  # heavy import: only when a hub dataset is actually read

    local = Path(path)
    if _is_saved_dataset_dir(local):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{local}: no split {split!r}; it has {sorted(ds.keys())}")
            ds = ds[split]
        name = local.name
    else:
        ds = datasets.load_dataset(str(path), config, split=split)
        name = str(path)
    out = _Collector(on_malformed, max_examples)
    for i, rec in enumerate(ds):
        if out.full:
            break
        out.take(_parse_hf_record, rec, f"hf:{name}:{split}:{i}")
    return out.result


# --------------------------------------------------------------------------- dispatch

_FILE_READERS: dict[str, Callable[..., ReadResult]] = {
    "gsm8k_aug": read_gsm8k_aug,
    "gsm8k": read_gsm8k,
    "prosqa": read_prosqa,
    "prontoqa": read_prontoqa,
}


def read_source(
    fmt: str,
    path: str | Path,
    split: str = "train",
    on_malformed: str = "error",
    max_examples: int | None = None,
    config: str | None = None,
) -> ReadResult:
    """Read ``path`` with the reader for format ``fmt`` (one of :data:`FORMATS`).

    For file formats ``path`` is a file, or a directory in which ``split`` picks the file
    (``gsm8k`` → ``{split}.jsonl``, ``gsm8k_aug`` → ``{split}.txt``, ``prosqa`` →
    ``prosqa_{split}.json``, ``prontoqa`` → ``prontoqa_{split}.json``). For ``hf`` the split is
    passed to the dataset loader.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "hf":
        return read_hf(path, split=split, on_malformed=on_malformed, max_examples=max_examples, config=config)
    file = Path(path)
    if file.is_dir():
        file = file / _SPLIT_FILES[fmt].format(split=split)
        if not file.exists():
            raise FileNotFoundError(f"format {fmt!r}, split {split!r}: expected {file}")
    return _FILE_READERS[fmt](file, on_malformed=on_malformed, max_examples=max_examples)
