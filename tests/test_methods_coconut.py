"""Coconut: curriculum helpers, what each stage replaces, labels, stage 0 = CoT, start from a CoT
checkpoint, and the KV-cache passes equal one forward with the latent slots filled in."""
import pytest
import torch
from conftest import make_cfg

from pipeline.data import Example
from pipeline.latent import cot_text, positions_from_mask
from pipeline.losses import IGNORE_INDEX, causal_lm_ce
from pipeline.methods import StepContext, coconut, cot


def test_stage_schedule_and_optimizer_reset():
    cfg = make_cfg("coconut")
    cc = cfg.method.coconut
    cc.epochs_per_stage, cc.max_latent_stage = 2, 3
    assert [coconut.stage_for_epoch(e, cfg) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert coconut.curriculum_epochs(cfg) == 8
    assert cc.reset_optimizer == "stage"      # the paper's default
    assert [coconut.should_reset_optimizer(e - 1, e, cfg) for e in range(1, 8)] == [
        False, True, False, True, False, True, False]
    cc.reset_optimizer = "epoch"              # the reference code
    assert all(coconut.should_reset_optimizer(e - 1, e, cfg) for e in range(1, 8))
    cc.reset_optimizer = "never"
    assert not any(coconut.should_reset_optimizer(e - 1, e, cfg) for e in range(1, 8))
    cc.init_from = "some/cot/export"          # the checkpoint is stage 0: start at stage 1
    assert [coconut.stage_for_epoch(e, cfg) for e in range(7)] == [1, 1, 2, 2, 3, 3, 3]
    assert coconut.curriculum_epochs(cfg) == 6
    cc.c_thought = 2
    assert coconut.inference_num_latents(cfg) == 6


def test_stage_by_optimizer_steps():
    """method.coconut.steps_per_stage: stages advance every N optimizer steps, whatever the epoch."""
    cfg = make_cfg("coconut")
    cc = cfg.method.coconut
    cc.max_latent_stage, cc.steps_per_stage = 3, 5
    assert [coconut.stage_at(0, s, cfg) for s in (0, 4, 5, 9, 10, 15, 99)] == [0, 0, 1, 1, 2, 3, 3]
    cc.init_from = "some/cot/export"
    assert [coconut.stage_at(7, s, cfg) for s in (0, 4, 5, 10, 11)] == [1, 1, 2, 3, 3]
    cc.steps_per_stage = None                 # back to epochs
    assert coconut.stage_at(2, 1000, cfg) == coconut.stage_for_epoch(2, cfg)


def test_stage_layout_replaces_first_k_steps_and_last_stage_removes_all():
    cfg = make_cfg("coconut")
    cfg.method.coconut.c_thought, cfg.method.coconut.max_latent_stage = 2, 3
    steps = ["a", "b", "c", "d", "e"]
    assert coconut.stage_layout(steps, 0, cfg) == (0, [], steps)
    assert coconut.stage_layout(steps, 1, cfg) == (2, ["a"], ["b", "c", "d", "e"])
    assert coconut.stage_layout(steps, 2, cfg) == (4, ["a", "b"], ["c", "d", "e"])
    assert coconut.stage_layout(steps, 3, cfg) == (6, steps, [])              # last stage: nothing left
    assert coconut.stage_layout(["a"], 2, cfg) == (4, ["a"], [])              # k·c latents for every row
    assert coconut.stage_layout(steps, 9, cfg) == (6, steps, [])


def test_collate_labels_cover_remaining_steps_answer_and_eos(build, gsm_examples):
    built = build(make_cfg("coconut"))
    tok, ids = built.loaded.tokenizer, built.loaded.token_ids
    examples = gsm_examples[4:6]
    batch = built.collate(examples, 1)
    assert batch["latent_active"].tolist() == [[1], [1]]
    assert (batch["prompt_ids"][:, -1] == ids["start_latent"]).all()          # left padded: same column
    for i, e in enumerate(examples):
        suffix = batch["suffix_ids"][i][batch["suffix_mask"][i].bool()].tolist()
        labels = batch["suffix_labels"][i][batch["suffix_mask"][i].bool()].tolist()
        assert suffix[0] == ids["end_latent"] and labels[0] == IGNORE_INDEX
        assert labels[1:] == suffix[1:]
        assert tok.decode(suffix[1:]) == cot_text(e.steps[1:], e.answer) + tok.eos_token
        assert batch["latent_steps"][i] == [e.steps[0]]


def test_stage_zero_is_cot_sft(build, gsm_examples):
    built = build(make_cfg("coconut"))
    batch = built.collate(gsm_examples[:4], 0)
    with torch.no_grad():
        stage0 = coconut.run(built.parts, batch, built.cfg, StepContext(stage=0))
        ref = cot.run(built.parts, cot.make_collate(make_cfg("cot"), built.loaded, built.parts)(gsm_examples[:4]),
                      built.cfg, StepContext())
    assert stage0.latents is None
    torch.testing.assert_close(stage0.loss, ref.loss)
    torch.testing.assert_close(stage0.per_row["ce"], ref.per_row["ce"])


def test_kv_cache_passes_equal_one_forward_with_filled_slots(build):
    """The paper's n+1 passes: fill slot j with the hidden state at j-1, run the whole sequence
    again; the final pass's loss must equal the cached rollout's."""
    built = build(make_cfg("coconut"))
    lm, tok, ids = built.parts["lm"], built.loaded.tokenizer, built.loaded.token_ids
    example = Example(question="Tom has 3 apples and buys 4.", steps=("<<3+4=7>>", "<<7*2=14>>"),
                      answer="14", source_id="x")
    batch = built.collate([example], 2)
    with torch.no_grad():
        fast = coconut.run(built.parts, batch, built.cfg, StepContext(stage=2))
        seq = torch.cat([batch["prompt_ids"][0], torch.full((2,), ids["latent"]), batch["suffix_ids"][0]])[None]
        labels = torch.cat([torch.full((batch["prompt_ids"].shape[1] + 2,), IGNORE_INDEX),
                            batch["suffix_labels"][0]])[None]
        mask = torch.ones_like(seq)
        embeds = lm.get_input_embeddings()(seq)
        first = batch["prompt_ids"].shape[1]
        for j in range(2):                      # pass j fills latent slot j
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                     output_hidden_states=True)
            embeds = embeds.clone()
            embeds[0, first + j] = out.hidden_states[-1][0, first + j - 1]
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask))
    torch.testing.assert_close(fast.loss, causal_lm_ce(out.logits, labels), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.latents[0], embeds[0, first: first + 2], atol=1e-5, rtol=1e-5)
    assert tok.decode(batch["suffix_ids"][0][1:].tolist()).startswith("The answer is: 14")


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_init_from_cot_export_loads_weights_under_lora(build, tmp_path, arch):
    source = build(make_cfg("cot", arch, lora=False), seed=5, live_lora=False)
    source.loaded.model.save_pretrained(tmp_path)
    source.loaded.tokenizer.save_pretrained(tmp_path)
    cfg = make_cfg("coconut", arch)
    cfg.method.coconut.init_from = str(tmp_path)
    built = build(cfg, seed=0, live_lora=False)              # LoRA B = 0: the model is the checkpoint
    ids = torch.tensor([[5, 6, built.loaded.token_ids["start_latent"], built.loaded.token_ids["end_latent"], 7]])
    with torch.no_grad():
        torch.testing.assert_close(built.parts["lm"](input_ids=ids).logits, source.loaded.model(input_ids=ids).logits)
