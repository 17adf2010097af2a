"""Gradients reach exactly what should train, and nothing frozen; the distillation target is detached
and the CODI teacher runs once."""
import pytest
import torch
from conftest import make_cfg

from pipeline.methods import StepContext
from pipeline.methods.step_decoder import ADAPTER_NAME

CASES = [
    ("cot", {}, 0, []),
    ("nocot", {}, 0, []),
    ("coconut", {}, 2, ["start_latent", "end_latent"]),
    ("codi", {}, 0, ["bot", "eot"]),
    ("simcot", {"simcot__decoder": "full"}, 0, ["bot", "eot"]),
    ("simcot", {"simcot__decoder": "shared"}, 0, ["bot", "eot"]),
    ("simcot", {"simcot__decoder": "separate", "simcot__decoder_model": "tiny-llama"}, 0, ["bot", "eot"]),
    ("simcot", {"simcot__base": "coconut", "simcot__decoder": "shared"}, 2, ["start_latent", "end_latent"]),
]


def step(built, examples, stage=0):
    loss, logs = built.module.compute_loss(built.parts, built.collate(examples, stage), built.cfg,
                                           StepContext(stage=stage))
    loss.backward()
    return loss, logs


def token_row_grads(model, token_ids):
    """{token id: |grad| of its trainable embedding row} from the latent-token rows' delta."""
    from pipeline.token_rows import token_rows

    rows = token_rows(model)
    assert rows is not None, "no trainable token rows"
    return {int(tid): float(rows.weight.grad[r].abs().sum()) for r, tid in enumerate(rows.token_ids)}


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method,fields,stage,used_tokens", CASES,
                         ids=[f"{m}-{'-'.join(map(str, f.values()))}" for m, f, _, _ in CASES])
def test_gradients_reach_trainable_parts_only(build, gsm_examples, arch, method, fields, stage, used_tokens):
    built = build(make_cfg(method, arch, **fields))
    loss, logs = step(built, gsm_examples[:4], stage)
    assert torch.isfinite(loss) and set(logs) >= ({"step_decoder"} if method == "simcot" else set())
    params = dict(built.parts.named_parameters())
    frozen = {n: p for n, p in params.items() if not p.requires_grad}
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    assert frozen, "the base weights must be frozen under LoRA"
    assert all(p.grad is None for p in frozen.values()), [n for n, p in frozen.items() if p.grad is not None]
    must_move = [n for n in trainable if "lora_" in n or n.startswith(("projection.", "decoder.", "decoder_proj."))]
    dead = [n for n in must_move if trainable[n].grad is None or trainable[n].grad.abs().sum() == 0]
    assert not dead, dead
    if "projection" in built.parts:
        assert all(p.grad is not None for p in built.parts["projection"].parameters())
    kind = fields.get("simcot__decoder")
    if kind in ("full", "separate"):
        assert all(p.requires_grad for p in built.parts["decoder"].parameters())
    if kind == "separate":
        assert built.parts["decoder_proj"].weight.grad.abs().sum() > 0
    if kind == "shared":
        # Both adapters train; the switch to the decoder's adapter left no flag changed.
        for adapter in ("default", ADAPTER_NAME):
            b_params = [p for n, p in trainable.items() if f"lora_B.{adapter}" in n]
            assert b_params and all(p.grad.abs().sum() > 0 for p in b_params), adapter
        assert "decoder" not in built.parts
    rows = token_row_grads(built.parts["lm"], built.loaded.token_ids)
    for key in used_tokens:             # the latent tokens this method feeds in are trained
        assert rows[built.loaded.token_ids[key]] > 0, key


def test_full_finetune_trains_every_weight(build, gsm_examples):
    built = build(make_cfg("codi", lora=False), live_lora=False)
    step(built, gsm_examples[:3])
    assert all(p.requires_grad for p in built.parts.parameters())
    missing = [n for n, p in built.parts.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("shared", [True, False], ids=["question-once", "two-pass"])
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_codi_distillation_target_is_detached_and_teacher_runs_once(build, gsm_examples, arch, shared):
    cfg = make_cfg("codi", arch)
    cfg.method.codi.shared_question_pass = shared
    built = build(cfg)
    lm = built.parts["lm"]
    batch = built.collate(gsm_examples[:3], 0)
    # The teacher's forward: [question ; CoT + answer] alone (two-pass), or CoT + answer on a branch
    # of the question's cache, right after the one question pass (question once).
    teacher_width = batch["teacher_suffix_ids"].shape[1] + (0 if shared else batch["teacher_prompt_ids"].shape[1])
    teacher_call = 1 if shared else 0
    widths, teacher_hidden = [], []

    def hook(module, args, kwargs, output):
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        widths.append(inputs.shape[1])
        if len(widths) - 1 == teacher_call:
            for h in output.hidden_states:
                h.retain_grad()
                teacher_hidden.append(h)

    handle = lm.register_forward_hook(hook, with_kwargs=True)
    try:
        # Distillation alone: no gradient may reach the teacher's hidden states.
        built.cfg.method.codi.alpha, built.cfg.method.codi.gamma = 0.0, 0.0
        loss, logs = built.module.compute_loss(built.parts, batch, built.cfg, StepContext())
        loss.backward()
        assert logs["distill"] > 0
        assert widths[teacher_call] == teacher_width and widths.count(teacher_width) == 1   # the teacher ran once
        assert len(widths) == built.cfg.method.num_latents + 3     # question/prompt, teacher, latents, answer
        if shared:     # the question is encoded once: no forward re-reads it
            assert widths.count(batch["student_prompt_ids"].shape[1]) == 1
        assert all(h.grad is None or h.grad.abs().sum() == 0 for h in teacher_hidden)
        # Sanity of the probe: with the teacher CE on, the same hidden states do get gradients.
        teacher_hidden.clear()
        widths.clear()
        built.cfg.method.codi.gamma = 1.0
        loss, _ = built.module.compute_loss(built.parts, batch, built.cfg, StepContext())
        loss.backward()
        assert any(h.grad is not None and h.grad.abs().sum() > 0 for h in teacher_hidden)
    finally:
        handle.remove()
