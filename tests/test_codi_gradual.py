"""CODI's gradual schedule (method.codi.gradual_steps_per_stage, issue 13's curriculum ablation):
stage k replaces the teacher's first k steps by k latents and the student writes the rest; from
stage num_latents on it is plain CODI. Checked on the batch, the loss and the stage schedule."""
import pytest
import torch
from conftest import make_cfg

from pipeline.config import ConfigError, load_config
from pipeline.methods import StepContext
from pipeline.methods.batching import answer_segment, encode
from pipeline.train import curriculum_stage


def gradual_cfg(method="codi", every=10, **fields):
    if method == "simcot":
        fields = {"simcot__decoder": "full", **fields}
    cfg = make_cfg(method, codi__gradual_steps_per_stage=every, **fields)
    cfg.method.num_latents = 4
    return cfg


def test_stages_advance_every_n_steps_then_stay_plain():
    cfg = gradual_cfg(every=10)
    assert [curriculum_stage(cfg, 0, s) for s in (0, 9, 10, 25, 30, 39, 40, 10_000)] == [1, 1, 2, 3, 4, 4, 4, 4]
    assert curriculum_stage(make_cfg("codi"), 0, 500) == 0                     # off: the paper's single stage


@pytest.mark.parametrize("position", ["before_answer", "after_reasoning"])
def test_stage_k_writes_the_remaining_steps_after_k_latents(build, gsm_examples, position):
    cfg = gradual_cfg(codi__distill_position=position)
    built = build(cfg)
    tok, eot = built.loaded.tokenizer, built.loaded.token_ids["eot"]
    examples = [e for e in gsm_examples if len(e.steps) >= 2]
    batch = built.collate(examples, 2)
    assert batch["num_latents"] == 2
    for r, ex in enumerate(examples):
        teacher_steps = list(ex.steps)[:-1]                          # include_last_step=false
        rest = encode(tok, "".join(s + "\n" for s in teacher_steps[2:]))
        answer, first = answer_segment(tok, ex.answer)
        suffix = batch["student_suffix_ids"][r][batch["student_suffix_mask"][r].bool()].tolist()
        assert suffix == [eot] + rest + answer + [tok.eos_token_id]
        labels = batch["student_suffix_labels"][r][: len(suffix)].tolist()
        assert labels == [-100] + rest + answer + [tok.eos_token_id]   # the written rest is learned
        assert batch["latent_steps"][r] == list(ex.steps)[:2]          # SIM-CoT: latent j <-> step j
        # The student's distilled column predicts what the teacher's does.
        t, s = int(batch["teacher_pos"][r]), int(batch["student_pos"][r])
        expected = answer[first] if position == "before_answer" else answer[0]
        assert int(batch["teacher_suffix_ids"][r, t + 1]) == expected
        assert int(batch["student_suffix_ids"][r, s + 1]) == expected


def test_last_stage_is_plain_codi(build, gsm_examples):
    built = build(gradual_cfg())
    plain, last = built.collate(gsm_examples, 0), built.collate(gsm_examples, 4)
    assert plain.keys() == last.keys() and last["num_latents"] == 4
    for key, value in plain.items():
        assert torch.equal(value, last[key]) if torch.is_tensor(value) else value == last[key], key


def test_simcot_at_a_stage_rolls_k_latents_and_supervises_them(build, gsm_examples):
    cfg = gradual_cfg("simcot")
    built = build(cfg)
    batch = built.collate(gsm_examples, 2)
    assert batch["step_has_target"].shape == (len(gsm_examples), 2)
    assert batch["step_has_target"].sum(1).tolist() == [min(2, len(e.steps)) for e in gsm_examples]
    out = built.module.run(built.parts, batch, cfg, StepContext(stage=2))
    assert out.latents.shape[:2] == (len(gsm_examples), 2)
    assert torch.isfinite(out.loss) and float(out.logs["step_decoder"]) > 0
    out.loss.backward()
    for name in ("projection", "decoder"):
        grads = [p.grad for p in built.parts[name].parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), name


def test_config_refuses_a_schedule_it_cannot_follow():
    with pytest.raises(ConfigError, match="method.codi.gradual_steps_per_stage: must be > 0"):
        load_config(None, ["method.name=codi", "method.codi.gradual_steps_per_stage=0"])
    with pytest.raises(ConfigError, match="method.codi.gradual_steps_per_stage: needs method.simcot.latents_per_step=1"):
        load_config(None, ["method.name=simcot", "method.simcot.decoder=full", "method.simcot.latents_per_step=2",
                           "method.num_latents=6", "method.codi.gradual_steps_per_stage=50"])
