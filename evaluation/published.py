"""Published accuracies (docs: /work/shared/docs/METHODS.md, "Reported results") as data.

Keys are canonical: model (:func:`canonical_model`), method (:func:`canonical_method`) and
benchmark (the registry name in :mod:`evaluation.benchmarks`). The main table is GSM8k-Aug test.
A test checks this table against METHODS.md, so the two cannot drift apart.
"""
from __future__ import annotations

import re

__all__ = ["PUBLISHED", "PUBLISHED_STD", "NOTES", "canonical_model", "canonical_method", "lookup"]

_MAIN_METHODS = ("nocot", "cot", "coconut", "coconut+simcot", "codi", "codi+simcot")
_MAIN_ROWS = {     # model: No-CoT, CoT-SFT, Coconut, +SIM-CoT, CODI, +SIM-CoT (GSM8k-Aug test)
    "gpt2": (19.1, 42.7, 36.6, 44.8, 42.0, 42.6),
    "llama-3.2-1b": (28.8, 58.4, 33.2, 42.2, 52.7, 56.1),
    "llama-3.2-3b": (38.3, 71.5, None, None, 60.8, 62.3),
    "llama-3.1-8b": (39.5, 71.7, None, None, 61.1, 64.1),
}

PUBLISHED: dict[tuple[str, str, str], float] = {
    (model, method, "gsm8k_aug"): value
    for model, values in _MAIN_ROWS.items()
    for method, value in zip(_MAIN_METHODS, values) if value is not None
}
PUBLISHED.update({
    # Out of domain, LLaMA-3.1-8B CODI+SIM-CoT.
    ("llama-3.1-8b", "codi+simcot", "gsm_hard"): 16.3,
    ("llama-3.1-8b", "codi+simcot", "multiarith"): 100.0,
    ("llama-3.1-8b", "codi+simcot", "svamp"): 79.4,
    # SoftCoT, Llama-3.1-8B (Instruct) base + 1B assistant; zero-shot CoT of the same base.
    ("llama-3.1-8b", "softcot", "gsm8k"): 81.03,
    ("llama-3.1-8b", "zeroshot-cot", "gsm8k"): 79.61,
})
PUBLISHED_STD = {("llama-3.1-8b", "softcot", "gsm8k"): 0.42}
NOTES = {
    "avg_tokens_gpt2_gsm8k_aug": {"cot": 27.6, "coconut": 12.2, "codi": 12.2},   # latents included
    "codi_speedup_over_cot": 2.7,   # GSM8k-Aug, batch 1, one A100
}


def canonical_model(name: str | None) -> str | None:
    """"meta-llama/Llama-3.2-1B-Instruct" → "llama-3.2-1b"; "openai-community/gpt2" → "gpt2"."""
    if not name:
        return None
    base = name.rstrip("/").split("/")[-1].lower()
    if re.fullmatch(r"gpt-?2", base):
        return "gpt2"
    m = re.match(r"(?:meta-)?llama-?(3\.[12])-(\d+)b", base)
    if m:
        return f"llama-{m.group(1)}-{m.group(2)}b"
    return base


_METHOD_ALIASES = {"no-cot": "nocot", "no_cot": "nocot", "cot-sft": "cot", "cot_sft": "cot",
                   "simcot": "codi+simcot", "sim-cot": "codi+simcot", "codi-simcot": "codi+simcot",
                   "coconut-simcot": "coconut+simcot", "softcot++": "softcot", "zero-shot-cot": "zeroshot-cot"}


def canonical_method(method: str | None) -> str | None:
    if not method:
        return None
    key = method.lower()
    return _METHOD_ALIASES.get(key, key)


# GSM8k-Aug test holds the GSM8K test questions with the same answers (shared/data/README.md).
_SAME_TEST_SET = {"gsm8k": "gsm8k_aug", "gsm8k_aug": "gsm8k"}


def lookup(model: str | None, method: str | None, benchmark: str) -> float | None:
    """The published accuracy (%) for this model/method/benchmark, or None.

    GSM8K and GSM8k-Aug share one test set, so a number published for either is shown for both.
    """
    key = (canonical_model(model), canonical_method(method))
    value = PUBLISHED.get((*key, benchmark))
    if value is None and benchmark in _SAME_TEST_SET:
        value = PUBLISHED.get((*key, _SAME_TEST_SET[benchmark]))
    return value
