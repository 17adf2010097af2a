"""CODI's one question pass (issue 12.1): the question is encoded once and the teacher and the
student branch from its KV cache; loss, parts, per-row values, latents and gradients equal the
two-pass reference (method.codi.shared_question_pass=false) with dropout off, on left-padded
batches of different question, CoT and answer lengths."""
import pytest
import torch
from conftest import make_cfg
from test_latent_rollout import tiny

from pipeline.latent import branch, forward_step, left_pad, right_pad
from pipeline.methods import StepContext

CASES = [("codi", {}), ("simcot", {"simcot__decoder": "full"}), ("simcot", {"simcot__decoder": "shared"})]


def step(build, method, arch, fields, examples, shared: bool):
    cfg = make_cfg(method, arch, **fields)
    cfg.method.codi.shared_question_pass = shared
    built = build(cfg)                         # same seeds: the same weights for both variants
    out = built.module.run(built.parts, built.collate(examples, 0), cfg, StepContext())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in built.parts.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method,fields", CASES, ids=[f"{m}-{'-'.join(f.values())}" for m, f in CASES])
def test_question_once_equals_two_passes(build, gsm_examples, arch, method, fields):
    once, g_once = step(build, method, arch, fields, gsm_examples, shared=True)
    twice, g_twice = step(build, method, arch, fields, gsm_examples, shared=False)
    torch.testing.assert_close(once.loss, twice.loss, rtol=1e-5, atol=1e-6)
    assert once.logs.keys() == twice.logs.keys()
    for key in twice.logs:
        torch.testing.assert_close(once.logs[key], twice.logs[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in twice.per_row:
        torch.testing.assert_close(once.per_row[key], twice.per_row[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(once.latents, twice.latents, rtol=1e-5, atol=1e-5)
    # Every parameter that trains gets the same gradient (question LoRA, token rows, projection, decoder).
    assert g_once.keys() == g_twice.keys() and g_twice
    flat_once = torch.cat([g_once[n].flatten() for n in g_twice])
    flat_twice = torch.cat([g_twice[n].flatten() for n in g_twice])
    assert float((flat_once - flat_twice).norm() / flat_twice.norm()) <= 1e-5
    for name in g_twice:
        torch.testing.assert_close(g_once[name], g_twice[name], rtol=1e-4, atol=1e-6 * float(flat_twice.abs().max()),
                                   msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_branch_hides_columns_grows_its_own_cache_and_both_branches_reach_the_prefix(arch):
    model = tiny(arch)
    emb = model.get_input_embeddings()
    ids, mask = left_pad([[3, 4, 5, 6, 9], [8, 9]], pad_id=0)              # question + a marker (9)
    prefix = emb(ids).detach().requires_grad_(True)
    suffix_ids, suffix_mask = right_pad([[13, 14, 15], [16]], pad_id=0)
    _, state = forward_step(model, prefix, mask, None)
    length = state.past_key_values.get_seq_length()

    teacher, _ = forward_step(model, emb(suffix_ids), suffix_mask, branch(state, hide_last=1))
    assert state.past_key_values.get_seq_length() == length               # the trunk's cache is untouched
    # The branch with the marker hidden = a fresh forward over the question alone, then the suffix.
    _, alone = forward_step(model, prefix[:, :-1], mask[:, :-1], None)
    reference, _ = forward_step(model, emb(suffix_ids), suffix_mask, alone)
    torch.testing.assert_close(teacher.logits, reference.logits, rtol=1e-5, atol=1e-5)

    student, _ = forward_step(model, emb(torch.tensor([[20], [21]])), torch.ones(2, 1, dtype=torch.long), state)
    # Gradients from each branch reach the shared prefix; the marker only through the trunk's branch.
    (g_teacher,) = torch.autograd.grad(teacher.logits.sum(), prefix, retain_graph=True)
    (g_student,) = torch.autograd.grad(student.logits.sum(), prefix, retain_graph=True)
    assert g_teacher[:, :-1].abs().sum() > 0 and g_student[:, :-1].abs().sum() > 0
    assert g_teacher[:, -1].abs().sum() == 0 and g_student[:, -1].abs().sum() > 0
    (g_both,) = torch.autograd.grad(teacher.logits.sum() + student.logits.sum(), prefix)
    torch.testing.assert_close(g_both, g_teacher + g_student)
