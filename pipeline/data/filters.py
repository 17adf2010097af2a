"""Example filters that count and log everything they change.

The reference implementations drop examples silently (CODI's negative-answer filter, length
filters); here every filter reports how many examples it touched, one log line per filter,
so a run's data loss is always visible in its log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .example import Example

__all__ = ["FilterReport", "apply_filters"]


@dataclass
class FilterReport:
    """Counts from one :func:`apply_filters` call.

    Attributes:
        n_in: examples given.
        n_out: examples kept.
        last_step_dropped: examples that lost their final step (``drop_last_step``); they are
            kept, even when left with no steps (``left_without_steps`` counts those).
        left_without_steps: examples with zero steps after ``drop_last_step`` (kept).
        non_digit_answer: examples dropped by ``require_digit_answer``.
        too_long: examples dropped by ``max_tokens``.
    """

    n_in: int = 0
    n_out: int = 0
    last_step_dropped: int = 0
    left_without_steps: int = 0
    non_digit_answer: int = 0
    too_long: int = 0

    @property
    def n_dropped(self) -> int:
        return self.n_in - self.n_out


def _answer_starts_with_digit(ex: Example) -> bool:
    answer = ex.answer.strip()
    return bool(answer) and answer[0].isdigit()


def apply_filters(
    examples: Iterable[Example],
    *,
    drop_last_step: bool = False,
    require_digit_answer: bool = False,
    max_tokens: int | None = None,
    count_tokens: Callable[[Example], int] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[Example], FilterReport]:
    """Apply the enabled filters in a fixed order and return ``(kept, report)``.

    Order (each sees the previous one's output):

    1. ``drop_last_step`` — remove each example's final step (CODI's teacher CoT default,
       ``include_last_step: false``). Examples left with zero steps are kept.
    2. ``require_digit_answer`` — drop examples whose answer does not start with a digit
       (CODI drops negative answers such as ``"-10"``).
    3. ``max_tokens`` — drop examples with ``count_tokens(example) > max_tokens``. It runs last so
       it measures the sequence actually trained (e.g. without the dropped step).
       ``count_tokens`` is required when ``max_tokens`` is set.

    ``log`` receives exactly one line per filter, including disabled ones ("off"), so the log
    shows which filters were applied.
    """
    if max_tokens is not None and count_tokens is None:
        raise ValueError("max_tokens needs count_tokens (a callable Example -> int)")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")

    kept = list(examples)
    report = FilterReport(n_in=len(kept))

    if drop_last_step:
        trimmed: list[Example] = []
        for ex in kept:
            if ex.steps:
                report.last_step_dropped += 1
                # nl_steps are a different granularity (sentences, not calculator steps), so
                # they are left untouched rather than guessed at.
                ex = dataclasses.replace(ex, steps=ex.steps[:-1])
            if not ex.steps:
                report.left_without_steps += 1
            trimmed.append(ex)
        kept = trimmed
        log(
            f"filter drop_last_step: removed the last step of {report.last_step_dropped} of "
            f"{len(kept)} examples ({report.left_without_steps} now have no steps; kept)"
        )
    else:
        log("filter drop_last_step: off")

    if require_digit_answer:
        before = len(kept)
        kept = [ex for ex in kept if _answer_starts_with_digit(ex)]
        report.non_digit_answer = before - len(kept)
        log(
            f"filter require_digit_answer: dropped {report.non_digit_answer} of {before} examples "
            "(answer does not start with a digit)"
        )
    else:
        log("filter require_digit_answer: off")

    if max_tokens is not None:
        assert count_tokens is not None  # checked above
        before = len(kept)
        kept = [ex for ex in kept if count_tokens(ex) <= max_tokens]
        report.too_long = before - len(kept)
        log(
            f"filter max_tokens={max_tokens}: dropped {report.too_long} of {before} examples "
            f"(longer than {max_tokens} tokens)"
        )
    else:
        log("filter max_tokens: off")

    report.n_out = len(kept)
    return kept, report
