"""The max_tokens filter measures the sequence the method trains; cut SIM-CoT targets are counted."""
import logging

import pytest

from conftest import make_cfg
from pipeline.data import apply_filters
from pipeline.data.lengths import trained_length
from pipeline.latent import cot_text, question_prompt
from pipeline.methods import step_decoder


def _longest_collated(batch) -> int:
    """Longest real sequence a collated single-example batch holds (prompt + suffix, latents included)."""
    lengths = []
    for prefix in ("", "teacher_", "student_"):
        if f"{prefix}prompt_mask" in batch:
            lengths.append(int(batch[f"{prefix}prompt_mask"].sum() + batch[f"{prefix}suffix_mask"].sum()))
    if "latent_active" in batch:       # coconut: latents sit between prompt and suffix
        lengths[0] += int(batch["latent_active"].sum())
    if "student_prompt_mask" in batch:
        lengths[-1] += 3               # cfg.method.num_latents of make_cfg
    return max(lengths)


@pytest.mark.parametrize("method", ["cot", "nocot", "codi", "coconut"])
def test_count_equals_the_longest_collated_sequence(method, build, gsm_examples):
    built = build(make_cfg(method, lora=False))
    count = trained_length(built.cfg, built.loaded.tokenizer)
    stages = range(0, built.cfg.method.coconut.max_latent_stage + 1) if method == "coconut" else [0]
    for ex in gsm_examples:
        assert count(ex) == max(_longest_collated(built.collate([ex], s)) for s in stages), (method, ex.steps)


def test_codi_example_that_fits_without_its_last_step_is_kept(build, gsm_examples):
    built = build(make_cfg("codi", lora=False))
    tok = built.loaded.tokenizer
    ex = max(gsm_examples, key=lambda e: len(e.steps))
    fits = trained_length(built.cfg, tok)(ex)
    old_count = len(tok(question_prompt(ex.question) + cot_text(ex.steps, ex.answer)).input_ids) + 1
    assert old_count > fits                  # the old count (all steps) would have dropped it
    kept, report = apply_filters([ex], max_tokens=fits, count_tokens=trained_length(built.cfg, tok), log=lambda m: None)
    assert kept == [ex] and report.too_long == 0
    kept, report = apply_filters([ex], max_tokens=fits - 1, count_tokens=trained_length(built.cfg, tok),
                                 log=lambda m: None)
    assert kept == [] and report.too_long == 1


def test_cut_step_targets_are_counted_and_logged(tokenizer, caplog, monkeypatch):
    monkeypatch.setitem(step_decoder.TRUNCATED, "targets", 0)
    monkeypatch.setitem(step_decoder.TRUNCATED, "cut", 0)
    long = " ".join(["<<12*34=408>>"] * 6)
    with caplog.at_level(logging.WARNING, logger=step_decoder.__name__):
        out = step_decoder.encode_targets([["<<1+1=2>>", long], [long, None]], tokenizer, max_tokens=8)
    assert out["step_mask"].sum(-1).tolist() == [[out["step_mask"][0, 0].sum().item(), 8], [8, 0]]
    assert step_decoder.TRUNCATED == {"targets": 3, "cut": 2}
    assert "2 of 3 step targets so far were longer and cut" in caplog.text
