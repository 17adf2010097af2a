"""Benchmarks: read a test file (or a Hugging Face dataset) into :class:`Instance` objects.

One converter per benchmark turns a source record into an instance; the same converter serves the
shipped file (``../shared/data``, formats in its README), any other path in that format, and the
matching Hugging Face dataset (``name=hf:owner/dataset[:config]:split``) when the hub is reachable.
A malformed record raises :class:`BenchmarkFormatError` naming the file, the line and the field.

>>> bench = load_benchmark("gsm8k", limit=2)             # doctest: +SKIP
>>> bench.instances[0].gold, bench.instances[0].kind     # doctest: +SKIP
('18', 'numeric')
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from evaluation.answers import format_number, parse_number

__all__ = [
    "Instance", "Benchmark", "BenchmarkFormatError", "BENCHMARKS", "ALIASES", "default_data_dir",
    "load_benchmark", "parse_benchmark_specs", "canonical_name",
]

KINDS = ("numeric", "choice", "bool", "prosqa")


@dataclass(frozen=True)
class Instance:
    """One test question. ``question`` is the text the model reads (choices included)."""

    id: str
    question: str
    gold: str
    kind: str                                  # numeric | choice | bool | prosqa
    choices: tuple[str, ...] | None = None     # option texts (labels A, B, … in order) / ProsQA entities
    reference_steps: tuple[str, ...] = ()
    source: str = ""                           # "gsm8k/test.jsonl:17"
    benchmark: str = ""                        # canonical name; with id and seed it seeds sampling


@dataclass
class Benchmark:
    name: str
    path: str
    instances: list[Instance] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # "path:line: field …: reason" (on_malformed="skip")


class BenchmarkFormatError(ValueError):
    """A malformed benchmark record: ``"<file>:<line>: field 'answer': <reason>"``."""

    def __init__(self, path: str, line: int | None, field_name: str | None, reason: str) -> None:
        self.path, self.line, self.field, self.reason = str(path), line, field_name, reason
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field {field_name!r}: " if field_name else ""
        super().__init__(f"{where}: {what}{reason}")


def default_data_dir() -> Path:
    """``$LATENT_EVAL_DATA`` or the checkout's sibling ``../shared/data``."""
    env = os.environ.get("LATENT_EVAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- readers
class _Where:
    """Location of one record, for error messages."""

    def __init__(self, path: str, line: int | None) -> None:
        self.path, self.line = path, line

    def error(self, field_name: str | None, reason: str) -> BenchmarkFormatError:
        return BenchmarkFormatError(self.path, self.line, field_name, reason)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _walk_array(text: str, i: int, path: str) -> Iterator[tuple[int, Any]]:
    """Elements of the JSON array starting at ``text[i] == '['`` with the line each starts on."""
    dec = json.JSONDecoder()
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    line, counted = _line_of(text, i), i          # counted incrementally: big files stay linear
    while True:
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(path, e.lineno, None, f"invalid JSON: {e.msg}") from None
        line += text.count("\n", counted, i)
        counted = i
        yield line, value
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < len(text) and text[i] == "]":
            return
        else:
            raise BenchmarkFormatError(path, _line_of(text, i), None, "invalid JSON: expected ',' or ']'")


def _walk_object_to(text: str, i: int, key: str, path: str) -> int | None:
    """Offset of the value of top-level ``key`` in the JSON object starting at ``text[i] == '{'``."""
    dec = json.JSONDecoder()
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] == '"':
        name, i = dec.raw_decode(text, i)
        i = _skip_ws(text, i)
        i = _skip_ws(text, i + 1)           # the ':'
        if name == key:
            return i
        _, i = dec.raw_decode(text, i)
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    return None


def _read_json_records(path: str, array_key: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line, record) from a JSON array, an object holding ``array_key: [...]``, or JSON lines."""
    text = Path(path).read_text(encoding="utf-8")
    i = _skip_ws(text, 0)
    if i < len(text) and text[i] == "[":
        yield from _walk_array(text, i, path)
        return
    if array_key is not None and i < len(text) and text[i] == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):      # not JSON lines either
                raise BenchmarkFormatError(path, e.lineno, None, f"invalid JSON: {e.msg}") from None
            whole = None
        if isinstance(whole, dict):
            if not isinstance(whole.get(array_key), list):
                raise BenchmarkFormatError(path, 1, array_key, "missing or not a list of examples")
            yield from _walk_array(text, _walk_object_to(text, i, array_key, path), path)
            return
    for lineno, line in enumerate(text.splitlines(), 1):   # JSON lines
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            value = BenchmarkFormatError(path, lineno, None, f"invalid JSON: {e.msg}")   # raised by the caller
        yield lineno, value


def _read_text_lines(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line.rstrip("\n")


# --------------------------------------------------------------------------- field helpers
def _get(rec: Any, key: str, where: _Where, types: type | tuple = str, label: str | None = None) -> Any:
    """``rec[key]`` checked for presence and type; ``label`` names nested fields ("question.stem")."""
    label = label or key
    if not isinstance(rec, dict):
        raise where.error(None, f"expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        raise where.error(label, "missing")
    value, tup = rec[key], types if isinstance(types, tuple) else (types,)
    if not isinstance(value, tup) or (isinstance(value, bool) and bool not in tup):
        names = "/".join(t.__name__ for t in tup)
        raise where.error(label, f"expected {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _number(value: Any, key: str, where: _Where) -> str:
    num = value if isinstance(value, (int, float)) and not isinstance(value, bool) else (
        parse_number(value) if isinstance(value, str) else None)
    if num is None:
        raise where.error(key, f"expected a number, got {value!r:.60}")
    return format_number(float(num))


def _steps(value: Any, key: str, where: _Where) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(s for s in value.split("\n") if s.strip())
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise where.error(key, "expected a list of strings")


def _with_choices(question: str, labels: list[str], texts: list[str]) -> str:
    opts = " ".join(f"({lab}) {txt}" for lab, txt in zip(labels, texts))
    return f"{question.strip()}\nAnswer Choices: {opts}"


def _check_labels(labels: list[str], key: str, where: _Where) -> None:
    expected = [chr(ord("A") + i) for i in range(len(labels))]
    if labels != expected:
        raise where.error(key, f"option labels must be {', '.join(expected)} in order, got {labels}")


# --------------------------------------------------------------------------- converters
# Each returns (question, gold, kind, choices, reference_steps, own_id or None).
def _gsm8k(rec, where):
    answer = _get(rec, "answer", where)
    if "####" not in answer:
        raise where.error("answer", "no '#### <answer>' line")
    body, gold = answer.rsplit("####", 1)
    return (_get(rec, "question", where), _number(gold.strip(), "answer", where), "numeric", None,
            _steps(body, "answer", where), None)


def _gsm8k_aug_line(line: str, where):
    if "||" not in line:
        raise where.error("question||steps", "no '||' separating question and steps")
    question, rest = line.split("||", 1)
    if "####" not in rest:
        raise where.error("answer", "no '#### <answer>' after the steps")
    steps, gold = rest.rsplit("####", 1)
    return (question, _number(gold.strip(), "answer", where), "numeric", None,
            tuple(re.findall(r"<<[^\n]*?>>", steps)), None)


def _gsm8k_aug(rec, where):     # Hugging Face rows: {"question", "steps"|"cot", "answer"}
    steps = rec.get("steps", rec.get("cot")) if isinstance(rec, dict) else None
    if isinstance(steps, str):
        steps = re.findall(r"<<[^\n]*?>>", steps) or [steps]
    return (_get(rec, "question", where), _number(_get(rec, "answer", where, (str, int, float)), "answer", where),
            "numeric", None, _steps(steps, "steps", where), None)


def _gsm_hard(rec, where):
    return (_get(rec, "input", where), _number(_get(rec, "target", where, (int, float)), "target", where),
            "numeric", None, (), None)


def _svamp(rec, where):
    question = f"{_get(rec, 'Body', where).strip()} {_get(rec, 'Question', where).strip()}"
    eq = rec.get("Equation")
    return (question, _number(_get(rec, "Answer", where, (int, float, str)), "Answer", where), "numeric",
            None, (eq,) if isinstance(eq, str) else (), rec.get("ID"))


def _multiarith(rec, where):
    if isinstance(rec, dict) and "sQuestion" not in rec and "question" in rec:   # HF ChilleD/MultiArith
        return (_get(rec, "question", where), _number(_get(rec, "final_ans", where, (str, int, float)),
                "final_ans", where), "numeric", None, (), None)
    sols = _get(rec, "lSolutions", where, list)
    if not sols:
        raise where.error("lSolutions", "empty list")
    idx = rec.get("iIndex")
    return (_get(rec, "sQuestion", where), _number(sols[0], "lSolutions", where), "numeric", None,
            _steps(rec.get("lEquations"), "lEquations", where), None if idx is None else str(idx))


def _field(rec, where: _Where, *names: str):
    """The first of ``names`` present in ``rec`` (ASDiv's XML tags or their lower-case JSONL keys)."""
    if not isinstance(rec, dict):
        raise where.error(None, f"expected a JSON object, got {type(rec).__name__}")
    for name in names:
        if name in rec:
            return name, rec[name]
    raise where.error(names[0], "missing")


def _asdiv(rec, where):
    """ASDiv (Miao et al. 2020): Body + Question; Answer "9 (apples)" (the unit in parentheses)."""
    body_key, body = _field(rec, where, "Body", "body")
    q_key, question = _field(rec, where, "Question", "question")
    a_key, answer = _field(rec, where, "Answer", "answer")
    for key, value in ((body_key, body), (q_key, question)):
        if not isinstance(value, str):
            raise where.error(key, f"expected str, got {type(value).__name__}")
    if isinstance(answer, str):
        answer = re.sub(r"\s*\(.*?\)\s*$", "", answer.strip())    # drop the unit: "9 (apples)" -> "9"
        if not re.fullmatch(r"[-+]?[\d,]*\.?\d+", answer):
            raise where.error(a_key, f"expected a number (with an optional unit), got {rec[a_key]!r:.60}")
    formula = rec.get("Formula", rec.get("formula"))
    own_id = rec.get("ID", rec.get("id"))
    return (f"{body.strip()} {question.strip()}", _number(answer, a_key, where), "numeric", None,
            (formula,) if isinstance(formula, str) and formula.strip() else (), own_id)


def _read_asdiv_xml(path: str) -> Iterator[tuple[int, Any]]:
    """(line, {tag: text, "ID": …}) per ``<Problem>`` of ASDiv's published ``ASDiv.xml``.

    The stdlib ElementTree (expat) never fetches external entities or DTDs; a document that declares
    entities is refused anyway, so entity-expansion tricks cannot run either.
    """
    import xml.etree.ElementTree as ET

    text = Path(path).read_text(encoding="utf-8")
    if "<!ENTITY" in text:
        raise BenchmarkFormatError(path, _line_of(text, text.index("<!ENTITY")), None,
                                   "XML entity declarations are not allowed")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise BenchmarkFormatError(path, e.position[0], None, f"invalid XML: {e}") from None
    problems = root.iter("Problem")
    offset = 0
    for problem in problems:
        pid = problem.get("ID")
        # ElementTree keeps no line numbers: find the element's own tag in the text, in document order.
        found = text.find(f'ID="{pid}"', offset) if pid is not None else text.find("<Problem", offset)
        offset = found + 1 if found >= 0 else offset
        rec = {child.tag: (child.text or "") for child in problem}
        if pid is not None:
            rec["ID"] = pid
        yield (_line_of(text, found) if found >= 0 else None), rec


_PROSQA_Q = re.compile(r"Is (\w+) an? (\w+) or (\w+)\?\s*$")


def _prosqa(rec, where):
    question, answer = _get(rec, "question", where), _get(rec, "answer", where)
    if not answer.strip():
        raise where.error("answer", "empty")
    m = _PROSQA_Q.search(question)
    return (question, answer, "prosqa", (m.group(2), m.group(3)) if m else None,
            _steps(rec.get("steps"), "steps", where), None)


def _prontoqa(rec, where):
    answer = _get(rec, "answer", where)
    if answer.strip() not in ("True", "False"):
        raise where.error("answer", f"expected 'True' or 'False', got {answer!r:.60}")
    return (_get(rec, "question", where), answer.strip(), "bool", ("True", "False"),
            _steps(rec.get("steps"), "steps", where), None)


def _commonsenseqa(rec, where):
    gold = _get(rec, "answerKey", where)
    q = _get(rec, "question", where, (dict, str))
    if isinstance(q, dict):             # the original jsonl: question.stem, question.choices[]
        stem = _get(q, "stem", where, label="question.stem")
        choices = _get(q, "choices", where, list, label="question.choices")
        if not all(isinstance(c, dict) and "label" in c and "text" in c for c in choices):
            raise where.error("question.choices", "expected a list of {label, text}")
        labels, texts = [c["label"] for c in choices], [c["text"] for c in choices]
    else:                               # Hugging Face tau/commonsense_qa: choices {label: [], text: []}
        stem, ch = q, _get(rec, "choices", where, dict)
        labels, texts = list(ch.get("label", [])), list(ch.get("text", []))
    _check_labels(labels, "question.choices", where)
    if gold not in labels:
        raise where.error("answerKey", f"{gold!r} is not one of the labels {labels}")
    return _with_choices(stem, labels, texts), gold, "choice", tuple(texts), (), rec.get("id")


def _strategyqa(rec, where):
    if isinstance(rec, dict) and "input" not in rec and "question" in rec:   # HF rows: answer bool
        ans = _get(rec, "answer", where, bool)
        return (_get(rec, "question", where), "Yes" if ans else "No", "bool", ("Yes", "No"),
                _steps(rec.get("facts"), "facts", where), rec.get("qid"))
    scores = _get(rec, "target_scores", where, dict)
    winners = [k for k, v in scores.items() if v == 1]
    if len(winners) != 1 or winners[0] not in ("Yes", "No"):
        raise where.error("target_scores", f"expected exactly one of Yes/No scored 1, got {scores}")
    target = rec.get("target")
    ref = (target.split(".", 1)[1].strip(),) if isinstance(target, str) and "." in target else ()
    return _get(rec, "input", where), winners[0], "bool", ("Yes", "No"), ref, None


def _aqua(rec, where):
    options = _get(rec, "options", where, list)
    labels, texts = [], []
    for opt in options:
        m = re.match(r"\s*([A-Z])\s*\)(.*)", opt if isinstance(opt, str) else "", re.S)
        if not m:
            raise where.error("options", f"expected 'A)…' strings, got {opt!r:.60}")
        labels.append(m.group(1))
        texts.append(m.group(2).strip())
    _check_labels(labels, "options", where)
    gold = _get(rec, "correct", where).strip()
    if gold not in labels:
        raise where.error("correct", f"{gold!r} is not one of the labels {labels}")
    return (_with_choices(_get(rec, "question", where), labels, texts), gold, "choice", tuple(texts),
            _steps(rec.get("rationale"), "rationale", where), None)


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    convert: Callable
    default_path: str | None          # relative to the data dir
    array_key: str | None = None      # JSON object key holding the examples (BIG-bench task.json)
    text_lines: Callable | None = None
    hf: str | None = None             # "owner/dataset[:config]:split" default on the hub


BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("gsm8k", _gsm8k, "gsm8k/test.jsonl", hf="openai/gsm8k:main:test"),
    BenchmarkSpec("gsm8k_aug", _gsm8k_aug, "gsm8k_aug/test.txt", text_lines=_gsm8k_aug_line,
                  hf="whynlp/gsm8k-aug:test"),
    BenchmarkSpec("gsm_hard", _gsm_hard, "gsm_hard/gsmhardv2.jsonl", hf="reasoning-machines/gsm-hard:train"),
    BenchmarkSpec("svamp", _svamp, "svamp/SVAMP.json", hf="ChilleD/SVAMP:test"),
    BenchmarkSpec("multiarith", _multiarith, None, hf="ChilleD/MultiArith:test"),
    # AddSub and SingleEq come in the same MAWPS JSON layout as MultiArith (iIndex, sQuestion,
    # lEquations, lSolutions).
    BenchmarkSpec("addsub", _multiarith, None),
    BenchmarkSpec("singleeq", _multiarith, None),
    BenchmarkSpec("asdiv", _asdiv, None),          # ASDiv.xml as published, or JSON(L) of the same fields
    BenchmarkSpec("prosqa", _prosqa, "prosqa/prosqa_test.json"),
    BenchmarkSpec("prontoqa", _prontoqa, "prontoqa/prontoqa_test.json"),
    BenchmarkSpec("commonsenseqa", _commonsenseqa, "commonsenseqa/dev_rand_split.jsonl",
                  hf="tau/commonsense_qa:validation"),
    BenchmarkSpec("strategyqa", _strategyqa, "strategyqa/task.json", array_key="examples"),
    BenchmarkSpec("aqua", _aqua, "aqua/test.json", hf="deepmind/aqua_rat:raw:test"),
]}
ALIASES = {"gsm8k-aug": "gsm8k_aug", "gsm8kaug": "gsm8k_aug", "gsmhard": "gsm_hard", "gsm-hard": "gsm_hard",
           "csqa": "commonsenseqa", "commonsense_qa": "commonsenseqa", "strategy_qa": "strategyqa",
           "aqua_rat": "aqua", "multi_arith": "multiarith",
           "add_sub": "addsub", "single_eq": "singleeq"}


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return key


def _hf_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """Rows of ``owner/dataset[:config]:split`` from the Hugging Face hub."""
    from datasets import load_dataset

    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"hf benchmark spec must be 'owner/dataset[:config]:split', got {spec!r}")
    ds = load_dataset(parts[0], parts[1] if len(parts) == 3 else None, split=parts[-1])
    for i, row in enumerate(ds):
        yield f"hf:{spec}[{i}]", dict(row)


def load_benchmark(name: str, path: str | os.PathLike | None = None, *, limit: int | None = None,
                   data_dir: str | os.PathLike | None = None, on_malformed: str = "error") -> Benchmark:
    """Read benchmark ``name`` from ``path`` (default: its file under the data dir; ``hf:…`` = hub).

    ``on_malformed="skip"``: a malformed record (or JSON line) is left out and its message kept in
    ``Benchmark.skipped``; instance ids stay the record's position, so they do not shift.
    """
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    spec = BENCHMARKS[canonical_name(name)]
    if path is None:
        if spec.default_path is None:
            raise ValueError(f"benchmark {spec.name!r} has no shipped file; pass {spec.name}=PATH "
                             f"(or {spec.name}=hf:{spec.hf})")
        path = Path(data_dir or default_data_dir()) / spec.default_path
    path = str(path)
    if path == "hf":
        if spec.hf is None:
            raise ValueError(f"benchmark {spec.name!r} has no default Hugging Face dataset; "
                             "pass NAME=hf:owner/dataset[:config]:split")
        path = f"hf:{spec.hf}"
    rows: Iterator[tuple[_Where, Any, bool]]
    if path.startswith("hf:"):
        rows = ((_Where(w, None), r, False) for w, r in _hf_rows(path[3:]))
    elif Path(path).is_dir():
        raise FileNotFoundError(f"benchmark {spec.name!r}: {path} is a directory, not a file")
    elif not Path(path).is_file():
        raise FileNotFoundError(f"benchmark {spec.name!r}: no file {path}")
    elif spec.name == "asdiv" and path.endswith(".xml"):
        rows = ((_Where(path, n), rec, False) for n, rec in _read_asdiv_xml(path))
    elif spec.text_lines is not None and not path.endswith((".json", ".jsonl")):
        rows = ((_Where(path, n), line, True) for n, line in _read_text_lines(path))
    else:
        rows = ((_Where(path, n), rec, False) for n, rec in _read_json_records(path, spec.array_key))
    instances, seen, skipped = [], set(), []
    for index, (where, rec, is_text) in enumerate(rows):
        if limit is not None and index >= limit:
            break
        try:
            if isinstance(rec, BenchmarkFormatError):       # an unreadable JSON line
                raise rec
            q, gold, kind, choices, steps, own_id = (spec.text_lines if is_text else spec.convert)(rec, where)
        except BenchmarkFormatError as err:
            if on_malformed == "error":
                raise
            skipped.append(str(err))
            continue
        inst_id = str(own_id) if own_id is not None else str(index)
        if inst_id in seen:
            inst_id = f"{inst_id}#{index}"
        seen.add(inst_id)
        where_s = f"{where.path}:{where.line}" if where.line is not None else where.path
        instances.append(Instance(id=inst_id, question=q.strip(), gold=gold, kind=kind,
                                  choices=choices, reference_steps=tuple(steps), source=where_s,
                                  benchmark=spec.name))
    return Benchmark(name=spec.name, path=path, instances=instances, skipped=skipped)


def parse_benchmark_specs(items: list[str]) -> list[tuple[str, str | None]]:
    """``["gsm8k", "svamp=/x/SVAMP.json", "all"]`` → ``[(name, path or None), …]``, order kept.

    ``all`` expands to every benchmark with a shipped file; comma-separated items are split.
    """
    out: list[tuple[str, str | None]] = []
    for item in (p.strip() for chunk in items for p in chunk.split(",")):
        if not item:
            continue
        if item == "all":
            out += [(n, None) for n, s in BENCHMARKS.items() if s.default_path]
            continue
        name, _, path = item.partition("=")
        out.append((canonical_name(name), path or None))
    names = [n for n, _ in out]
    dups = {n for n in names if names.count(n) > 1}
    if dups:
        raise ValueError(f"benchmark given twice: {', '.join(sorted(dups))}")
    return out
