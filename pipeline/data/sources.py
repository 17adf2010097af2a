"""The configured data sources, read and validated before anything heavy loads.

`latent-train` calls :func:`read_section` right after the config loads (pure Python: no torch, no
DeepSpeed, no tokenizer), so a malformed file fails in a second with exit 2 and one line::

    data error: /data/train.txt:12: field 'answer': missing '####' before the answer (data.train.0)

instead of a traceback after minutes of setup. The result is kept, so the run that follows reads
each file once. With ``data.on_malformed=skip`` the skipped ``path:line`` entries go to
``<output_dir>/skipped_examples.txt`` (:func:`write_skipped`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import on_codi

from .example import DataFormatError, Example
from .readers import _SPLIT_FILES, ReadResult, _display_name, read_source
from .views import exclude_questions, missing_natural_language, with_step_text

__all__ = ["DataError", "SectionData", "check_written_step", "format_error", "read_section", "resolve_file", "write_skipped"]

SKIPPED_FILE = "skipped_examples.txt"


class DataError(ValueError):
    """A data source that cannot be read; the message names the file, line and field."""


@dataclass
class SectionData:
    """Every source of `data.train` (or `data.eval`), read."""

    examples: list[Example]
    per_source: list[tuple[str, int, int]]     # (path, examples kept, malformed skipped)
    skipped: list[str]                         # "path:line: field 'x': reason", one per skipped record
    excluded: int = 0                          # train examples dropped as data.eval questions


_CACHE: dict[tuple, ReadResult] = {}


def resolve_file(fmt: str, path: str, split: str, where: str) -> Path:
    """The file a file-format source reads; a directory must hold the split's file."""
    file = Path(path)
    if file.is_dir():
        expected = file / _SPLIT_FILES[fmt].format(split=split)
        if not expected.is_file():
            raise DataError(f"{where}: {path} is a directory, not a file; format {fmt!r} with split "
                            f"{split!r} looks for {expected.name} in it, which does not exist")
        return expected
    if not file.is_file():
        raise DataError(f"{where}: file {path} does not exist")
    return file


def format_error(err: DataFormatError, file: Path | None) -> str:
    """`path:line: field 'f': reason` with the path as configured (readers name parent/file only)."""
    where = err.where
    if file is not None and where.startswith(_display_name(file)):
        where = str(file) + where[len(_display_name(file)):]
    reason = err.reason
    if err.field and f"'{err.field}'" not in reason:
        reason = f"field '{err.field}': {reason}"
    return f"{where}: {reason}"


def _read(fmt: str, path: str, split: str, on_malformed: str, max_examples, where: str,
          config: str | None = None) -> tuple[ReadResult, Path | None]:
    file = None if fmt == "hf" else resolve_file(fmt, path, split, where)
    stat = file.stat() if file is not None else None
    key = (fmt, str(file or path), split, on_malformed, max_examples, config,
           stat and (stat.st_mtime_ns, stat.st_size))
    if key not in _CACHE:
        try:
            _CACHE[key] = read_source(fmt, file or path, split, on_malformed, max_examples, config)
        except DataFormatError as err:
            raise DataError(f"{format_error(err, file)} ({where})") from None
        except OSError as err:
            raise DataError(f"{where}: cannot read {path}: {err.strerror or err}") from None
    return _CACHE[key], file


def read_section(cfg, section: str = "train") -> SectionData:
    """Read every source of `cfg.data.<section>` under `cfg.data.on_malformed`; DataError on failure."""
    out = SectionData(examples=[], per_source=[], skipped=[])
    for i, src in enumerate(getattr(cfg.data, section)):
        result, file = _read(src.format, src.path, src.split, cfg.data.on_malformed, src.max_examples,
                             f"data.{section}.{i}", src.config)
        try:
            examples = with_step_text(result.examples, src.steps,
                                      f"data.{section}.{i}.steps")
        except ValueError as err:
            raise DataError(str(err)) from None
        out.examples += examples
        out.per_source.append((src.path, len(examples), len(result.skipped)))
        name = _display_name(file) if file is not None else None
        out.skipped += [str(file) + m[len(name):] if name and m.startswith(name) else m for m in result.skipped]
    if section == "train" and cfg.data.exclude_eval_questions and cfg.data.eval:
        out.examples, out.excluded = exclude_questions(out.examples, read_section(cfg, "eval").examples)
    _check_method_needs(cfg, out.examples, section)
    return out


def _check_method_needs(cfg, examples, section: str) -> None:
    """Refuse, before any model loads, data a method cannot use (both sections are collated for it)."""
    _check_distill_position(cfg, examples, section)
    if section == "train":
        _check_socratic_target(cfg, examples)


def _check_distill_position(cfg, examples, section: str) -> None:
    """CODI / SIM-CoT distilled after the reasoning need a written step in the teacher's text: without
    the last step (include_last_step=false, the default) a 1-step problem (GSM8k-Aug has them) has
    none, and the run would otherwise stop at the first batch that holds one."""
    codi = cfg.method.codi
    if not on_codi(cfg) or codi.distill_position != "after_reasoning":
        return
    for ex in examples:
        check_written_step(ex, codi.include_last_step, f"data.{section} example")


def check_written_step(ex, include_last_step: bool, what: str = "example") -> None:
    """DataError unless the teacher's text of `ex` keeps a written step (distill_position=after_reasoning);
    the codi collate calls it too, for batches built outside `read_section`."""
    if len(ex.steps) < (1 if include_last_step else 2):
        raise DataError(f"{ex.source_id}: method.codi.distill_position=after_reasoning needs a written "
                        f"step before the answer in the teacher's text; this {what} has {len(ex.steps)} "
                        f"step(s) and include_last_step={include_last_step} (keep the last step, filter the "
                        "data, or distil before_answer)")


def _check_socratic_target(cfg, examples) -> None:
    """SoftCoT's Socratic target is built from natural-language solution lines: refuse data that has
    only calculator annotations (GSM8k-Aug lines)."""
    sc = cfg.method.softcot
    if cfg.method.name != "softcot" or sc.target != "socratic":
        return
    for ex in examples:
        if missing_natural_language(ex):
            raise DataError(f"{ex.source_id}: method.softcot.target=socratic needs GSM8K's natural-language "
                            "solution lines, but this example has calculator annotations only; read GSM8K "
                            "jsonl (format gsm8k, e.g. ../shared/data/gsm8k/train.jsonl) or set "
                            "method.softcot.target=annotations")


def write_skipped(output_dir: str | Path, skipped: list[str]) -> Path:
    """`<output_dir>/skipped_examples.txt`: one skipped `path:line: reason` per line (rank 0 calls it)."""
    path = Path(output_dir) / SKIPPED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in skipped))
    return path
