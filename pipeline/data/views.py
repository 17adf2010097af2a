"""Views of read examples that a config selects, applied in the data layer so methods need no change.

* **Step text** (`data.train.N.steps`): ``annotations`` keeps ``Example.steps`` as the reader gave
  them (GSM8K: the ``<<48/2=24>>`` calculator annotations, the GSM8k-Aug layout);
  ``natural_language`` swaps in ``Example.nl_steps``, the solution's sentences without the
  annotations (the CODI paper's GSM8k-Aug-NL setting). CoT-SFT, Coconut, CODI and SIM-CoT read
  ``steps`` only, so they train on sentences, and SIM-CoT's step decoder explains each latent in words.
* **Socratic lines** (SoftCoT's published target): the natural-language lines again, one
  ``## Step i:`` line each (``pipeline.latent.socratic_text``).
* **Validation hold-out** (`data.exclude_eval_questions`): training examples whose question is also
  in `data.eval` are dropped and counted, so a validation split cut from a train set (GSM8k-Aug's
  ``valid`` holds 500 GSM8K *train* questions) never overlaps what trains.

The GSM8K Socratic train split
------------------------------
OpenAI ships ``train_socratic.jsonl``/``test_socratic.jsonl`` beside GSM8K; only the test file is in
``../shared/data``. A Socratic answer is the plain answer with an automatically generated
sub-question (model-written, no public rule) before each solution line: ``Q? ** line``. On the
shipped test split, removing ``Q? ** `` gives test.jsonl's answer exactly, for all 1,319 records
(tests/test_data_socratic.py checks it), and no plain GSM8K line contains ``" ** "``. So the
Socratic split is derived from ``train.jsonl`` the same way the GSM8K reader reads
``test_socratic.jsonl``: its solution lines, annotations dropped. What the derived split **is**:
the 7,473 train questions with exactly the solution lines, answers and line count of the Socratic
file. What it **is not**: it has no sub-questions (the reference SoftCoT target keeps them, and
its calculator annotations, in each ``## Step`` line); they cannot be regenerated. A Socratic file
(``openai/gsm8k`` config ``socratic`` from the hub) reads to the same examples.
"""
from __future__ import annotations

import dataclasses

from .example import Example

__all__ = ["SOCRATIC_SEPARATOR", "STEP_TEXTS", "exclude_questions", "missing_natural_language", "question_key",
           "socratic_solution_line", "with_step_text"]

STEP_TEXTS = ("annotations", "natural_language")

# A Socratic line: "How many eggs does Janet sell? ** Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 ...".
# In the shipped test split the part after the separator is byte-identical to test.jsonl's line
# (all 1,319 answers), and no plain GSM8K line contains " ** ".
SOCRATIC_SEPARATOR = " ** "


def socratic_solution_line(line: str) -> str:
    """The solution part of a GSM8K line: after a Socratic sub-question when there is one."""
    return line.split(SOCRATIC_SEPARATOR, 1)[1] if SOCRATIC_SEPARATOR in line else line


def missing_natural_language(ex: Example) -> bool:
    """True when an example has steps but no natural-language lines (GSM8k-Aug annotation lines).

    Sources whose steps are sentences already (ProsQA, ProntoQA) carry no separate ``nl_steps``;
    they count as natural language when no step is a calculator annotation.
    """
    return bool(ex.steps) and not ex.nl_steps and any(s.startswith("<<") for s in ex.steps)


def with_step_text(examples: list[Example], step_text: str, where: str) -> list[Example]:
    """`examples` with `steps` in the requested text; DataError-style ValueError naming the record."""
    if step_text not in STEP_TEXTS:
        raise ValueError(f"{where}: unknown step text {step_text!r}; choose one of {', '.join(STEP_TEXTS)}")
    if step_text == "annotations":
        return examples
    out = []
    for ex in examples:
        if missing_natural_language(ex):
            raise ValueError(f"{ex.source_id}: has calculator-annotation steps but no natural-language lines "
                             f"({where}=natural_language); read GSM8K jsonl (format gsm8k) or a "
                             f"GSM8k-Aug-NL source, or set {where}=annotations")
        out.append(dataclasses.replace(ex, steps=ex.nl_steps) if ex.nl_steps else ex)
    return out


def question_key(question: str) -> str:
    """Questions compare with whitespace collapsed (files differ in double spaces and line ends)."""
    return " ".join(question.split())


def exclude_questions(examples: list[Example], held_out: list[Example]) -> tuple[list[Example], int]:
    """(examples whose question is not in `held_out`, how many were dropped)."""
    keys = {question_key(ex.question) for ex in held_out}
    kept = [ex for ex in examples if question_key(ex.question) not in keys]
    return kept, len(examples) - len(kept)
