"""The data layer's views: the GSM8K Socratic split derived from train.jsonl, natural-language step
text for CoT-SFT / Coconut / CODI / SIM-CoT (GSM8k-Aug-NL style), and the validation hold-out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from pipeline.config import load_config
from pipeline.data import read_gsm8k
from pipeline.data.sources import DataError, read_section
from pipeline.data.views import with_step_text
from pipeline.methods import StepContext

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "gsm8k"
GSM = ROOT / "tests" / "fixtures" / "gsm8k_train.jsonl"
AUG = ROOT / "tests" / "fixtures" / "gsm8k_aug_train.txt"
NATALIA_NL = ("Natalia sold 48/2 = 24 clips in May.", "Natalia sold 48+24 = 72 clips altogether in April and May.")

needs_shared = pytest.mark.skipif(not (SHARED / "test_socratic.jsonl").is_file(), reason="../shared/data absent")


@needs_shared
def test_socratic_file_reads_to_the_plain_files_examples():
    """The derivation rule, checked on the one split that ships in both forms: every Socratic line is
    `sub-question ** plain line`, so both files give the same 1,319 examples."""
    plain, socratic = read_gsm8k(SHARED / "test.jsonl").examples, read_gsm8k(SHARED / "test_socratic.jsonl").examples
    assert len(plain) == len(socratic) == 1319
    for p, s in zip(plain, socratic):
        assert (p.question, p.steps, p.nl_steps, p.answer) == (s.question, s.steps, s.nl_steps, s.answer)
    raw = json.loads((SHARED / "test_socratic.jsonl").read_text().splitlines()[0])["answer"]
    assert raw.startswith("How many eggs does Janet sell? ** Janet sells 16 - 3 - 4 = <<16-3-4=9>>9")
    assert socratic[0].nl_steps[0] == "Janet sells 16 - 3 - 4 = 9 duck eggs a day."


@needs_shared
def test_derived_socratic_train_split_keeps_every_solution_line():
    lines = (SHARED / "train.jsonl").read_text().splitlines()
    examples = read_gsm8k(SHARED / "train.jsonl").examples
    assert len(examples) == len(lines) == 7473
    for line, ex in zip(lines[:500], examples):
        body = json.loads(line)["answer"].rpartition("####")[0]
        assert len(ex.nl_steps) == sum(1 for t in body.splitlines() if t.strip())
        assert not any("<<" in s or " ** " in s for s in ex.nl_steps)


def test_natural_language_step_text_option(tmp_path):
    cfg = load_config(None, ["data.train.0.format=gsm8k", f"data.train.0.path={GSM}",
                             "data.train.0.steps=natural_language"])
    ex = read_section(cfg, "train").examples[0]
    assert ex.steps == NATALIA_NL == ex.nl_steps
    plain = read_section(load_config(None, ["data.train.0.format=gsm8k", f"data.train.0.path={GSM}"]), "train")
    assert plain.examples[0].steps == ("<<48/2=24>>", "<<48+24=72>>")
    # GSM8k-Aug lines have annotations only: a clear error naming file, line and field.
    bad = load_config(None, ["data.train.0.steps=natural_language"])
    with pytest.raises(DataError, match=r"gsm8k_aug_train.txt:1: .*data.train.0.steps=natural_language"):
        read_section(bad, "train")
    with pytest.raises(Exception, match="data.train.0.steps"):
        load_config(None, ["data.train.0.steps=words"])


def test_eval_questions_are_held_out_of_training(tmp_path):
    picked = [json.loads(line) for line in GSM.read_text().splitlines()[:3]]
    valid = tmp_path / "valid.txt"          # GSM8k-Aug layout, question whitespace changed
    valid.write_text("".join(f"{r['question'].replace(' ', '  ')}||<<1+1=2>> #### 2\n" for r in picked))
    base = ["data.train.0.format=gsm8k", f"data.train.0.path={GSM}", "data.eval=[{format: gsm8k_aug, path: "
            f"{valid}}}]"]
    kept = read_section(load_config(None, [*base, "data.exclude_eval_questions=true"]), "train")
    assert kept.excluded == 3 and len(kept.examples) == 17
    assert not {r["question"] for r in picked} & {e.question for e in kept.examples}
    assert read_section(load_config(None, base), "train").excluded == 0


@pytest.mark.parametrize("method, extra", [("cot", {}), ("coconut", {}), ("codi", {}),
                                           ("simcot", {"simcot__decoder": "full", "simcot__max_step_tokens": 64})])
def test_natural_language_steps_train_every_method(build, method, extra):
    """Methods read `steps` only: with the NL view they train on sentences, untouched."""
    examples = with_step_text(read_gsm8k(GSM).examples[:4], "natural_language", "data.train.0.steps")
    built = build(make_cfg(method, lora=method != "simcot", **extra))
    tok = built.loaded.tokenizer
    batch = built.collate(examples, 1 if method == "coconut" else 0)
    if method in ("cot", "codi"):           # CoT-SFT's target, CODI's teacher: the sentences
        key = "suffix_ids" if method == "cot" else "teacher_suffix_ids"
        first = tok.decode(batch[key][0][batch[key.replace("ids", "mask")][0].bool()])
        assert first.startswith(NATALIA_NL[0] + "\n") and "<<" not in first
    if method == "coconut":                 # stage 1: the first sentence became a latent, the rest is text
        texts = [tok.decode(row[row != tok.pad_token_id]) for row in batch["suffix_ids"]]
        assert texts[0].startswith("<|end-latent|>" + NATALIA_NL[1]) and NATALIA_NL[0] not in texts[0]
    if method == "simcot":                  # the step decoder explains latent k as sentence k
        mask = batch["step_mask"][0].bool()
        decoded = [tok.decode(batch["step_ids"][0, k][mask[k]]) for k in range(2)]
        assert [d.removesuffix(tok.eos_token).strip() for d in decoded] == list(NATALIA_NL)
    loss, _ = built.module.compute_loss(built.parts, batch, built.cfg, StepContext(stage=1 if method == "coconut" else 0))
    assert torch.isfinite(loss)
