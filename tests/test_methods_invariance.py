"""Batch invariance: each row's losses and latents are the same alone or inside a padded batch.

Rows of the batch have different question lengths (left padding differs) and different step and
answer lengths (right padding differs). LoRA B is randomised so the adapters really act.
"""
import pytest
import torch
from conftest import make_cfg

from pipeline.methods import StepContext

CASES = [
    ("cot", {}, 0),
    ("nocot", {}, 0),
    ("coconut", {}, 2),
    ("codi", {}, 0),
    ("simcot", {"simcot__decoder": "full"}, 0),
    ("simcot", {"simcot__decoder": "shared"}, 0),
    ("simcot", {"simcot__decoder": "separate", "simcot__decoder_model": "tiny-llama"}, 0),
    ("simcot", {"simcot__base": "coconut", "simcot__decoder": "shared"}, 3),
]


def per_row(built, examples, stage, agree_max=None):
    ctx = StepContext(stage=stage, agree_max=agree_max or (lambda n: n))
    with torch.no_grad():
        return built.module.run(built.parts, built.collate(examples, stage), built.cfg, ctx)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method,fields,stage", CASES, ids=[f"{m}-{'-'.join(map(str, f.values()))}" for m, f, _ in CASES])
def test_rows_alone_equal_rows_in_batch(build, gsm_examples, arch, method, fields, stage):
    built = build(make_cfg(method, arch, **fields))
    examples = gsm_examples[::2][:4]                 # 1, 2, 3 and 4+ steps
    together = per_row(built, examples, stage)
    names = list(together.per_row)     # CODI's distill too: divided by each row's own teacher std by default
    assert names
    for i, ex in enumerate(examples):
        alone = per_row(built, [ex], stage)
        for name in names:
            torch.testing.assert_close(together.per_row[name][i], alone.per_row[name][0], atol=2e-5, rtol=2e-5,
                                       msg=lambda m, name=name, i=i: f"{name} row {i}: {m}")
        if together.latents is not None:
            used = together.latent_active[i].bool()
            torch.testing.assert_close(together.latents[i][used], alone.latents[0][used], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("method,fields", [("coconut", {}), ("simcot", {"simcot__base": "coconut",
                                                                        "simcot__decoder": "full"})])
def test_coconut_padding_latent_columns_for_other_ranks_changes_nothing(build, gsm_examples, method, fields):
    """Another rank needing more latent passes (agree_max > local count) only adds masked columns."""
    built = build(make_cfg(method, **fields))
    local = per_row(built, gsm_examples[:4], 2)
    padded = per_row(built, gsm_examples[:4], 2, agree_max=lambda n: n + 2)
    assert padded.latents.shape[1] == local.latents.shape[1] + 2
    assert padded.latent_active[:, -2:].sum() == 0
    for name in local.per_row:
        torch.testing.assert_close(padded.per_row[name], local.per_row[name], atol=2e-5, rtol=2e-5)
