"""Published numbers match METHODS.md; model/method names map onto them; tables render."""
import re
from pathlib import Path

import pytest

from evaluation.published import PUBLISHED, canonical_method, canonical_model, lookup
from evaluation.report import markdown_table

METHODS_MD = Path(__file__).resolve().parents[2] / "shared" / "docs" / "METHODS.md"


@pytest.mark.skipif(not METHODS_MD.is_file(), reason="../shared/docs/METHODS.md not present")
def test_published_table_matches_methods_md():
    text = METHODS_MD.read_text()
    rows = re.findall(r"^\| (GPT-2|LLaMA-[\d.]+-\dB) \|(.*)\|$", text, re.M)
    assert len(rows) == 4
    methods = ["nocot", "cot", "coconut", "coconut+simcot", "codi", "codi+simcot"]
    expected = {}
    for model, cells in rows:
        for method, cell in zip(methods, [c.strip() for c in cells.split("|")]):
            if cell not in ("–", "-"):
                expected[(canonical_model(model), method, "gsm8k_aug")] = float(cell)
    assert {k: v for k, v in PUBLISHED.items() if k[2] == "gsm8k_aug"} == expected
    ood = re.search(r"GSM-Hard (\d+\.\d+), MultiArith (\d+\.\d+), SVAMP (\d+\.\d+)", text)
    assert [PUBLISHED[("llama-3.1-8b", "codi+simcot", b)] for b in ("gsm_hard", "multiarith", "svamp")] == \
        [float(x) for x in ood.groups()]
    assert f"GSM8K {PUBLISHED[('llama-3.1-8b', 'softcot', 'gsm8k')]:.2f} ± 0.42" in text


def test_names_map_onto_the_table():
    assert canonical_model("meta-llama/Llama-3.2-1B-Instruct") == "llama-3.2-1b"
    assert canonical_model("meta-llama/Meta-Llama-3.1-8B") == "llama-3.1-8b"
    assert canonical_model("openai-community/gpt2") == "gpt2"
    assert canonical_method("CoT-SFT") == "cot" and canonical_method("simcot") == "codi+simcot"
    assert lookup("gpt2", "coconut+simcot", "gsm8k_aug") == 44.8
    assert lookup("gpt2", "codi", "gsm8k") == 42.0                 # same test set as GSM8k-Aug
    assert lookup("HuggingFaceTB/SmolLM2-135M", "codi", "gsm8k_aug") is None


def test_markdown_table_shows_published_and_seeds():
    stat = {"mean": 50.0, "std": 1.5}
    run = {"method": "codi", "model": "gpt2", "results": [{
        "benchmark": "gsm8k_aug", "num_latents": 6, "n": 10, "seeds": [41, 42],
        "per_seed": {"41": {"accuracy_strict": 48.5, "accuracy_flexible": 48.5, "avg_tokens_incl_latents": 12.0,
                            "examples_per_s": 3.0},
                     "42": {"accuracy_strict": 51.5, "accuracy_flexible": 51.5, "avg_tokens_incl_latents": 12.0,
                            "examples_per_s": 3.0}},
        "accuracy": {"strict": stat, "flexible": stat}, "avg_tokens_incl_latents": 12.0, "examples_per_s": 3.0,
        "published": 42.0}]}
    table = markdown_table([run])
    assert "| gsm8k_aug | codi | gpt2 | 6 | 10 | 2 | 50.00 ± 1.50 | 50.00 ± 1.50 | 42.0 | 12.0 | 3.00 |" in table
    assert "| gsm8k_aug | codi | 6 | 42 | 51.50 | 51.50 | 12.0 | 3.00 |" in table
