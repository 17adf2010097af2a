"""One optimizer step of every method on one global batch of 8, split three ways (issue 10.3):

    1 rank x micro batch 8        1 rank x 4 x accumulation 2        2 ranks x 4

    torchrun --standalone --nproc_per_node 2 tests/dist/normalisation_steps.py SPEC.json

The global batch mixes 2-step and 7-step GSM8k-Aug examples (the short ones first, so the micro
batches and ranks have very different target counts). `one_step` runs exactly what the training
loop runs for one optimizer step (`train.step_counts`, `Strategy.forward`, `backward_share`) and
returns the logged loss and parts (shares summed over micro batches and ranks) and the gradient of
every trainable parameter at the accumulation boundary, before the optimizer step.
SPEC.json: {"out": DIR}; rank 0 writes DIR/two_ranks.pt ({method: result}) for every method.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data import read_gsm8k_aug  # noqa: E402
from pipeline.tokenizer_build import FIXTURES_DIR  # noqa: E402

TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=4",
        "model.tiny.vocab_size=500", "train.export=false", "method.num_latents=3"]
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0"]
COCONUT = ["method.coconut.c_thought=1", "method.coconut.max_latent_stage=3"]
# name -> (overrides, Coconut stage): every method whose loss is normalised by global counts.
METHODS = {
    "cot": (["method.name=cot"], 0),
    "nocot": (["method.name=nocot"], 0),
    "coconut": (["method.name=coconut", *COCONUT], 2),
    "codi": (["method.name=codi", *LORA], 0),
    "simcot_full": (["method.name=simcot", "method.simcot.decoder=full"], 0),
    "simcot_shared": (["method.name=simcot", "method.simcot.decoder=shared", *LORA], 0),
    "simcot_shared_coconut": (["method.name=simcot", "method.simcot.decoder=shared", "method.simcot.base=coconut",
                               *COCONUT, *LORA], 2),
}


def global_batch() -> list:
    """4 two-step then 4 seven-step examples (questions of different lengths too)."""
    examples = read_gsm8k_aug(FIXTURES_DIR / "gsm8k_aug_train.txt").examples
    by_steps = {n: [e for e in examples if len(e.steps) == n and e.answer.isdigit()] for n in (2, 7)}
    return by_steps[2][:4] + by_steps[7][:4]


def one_step(name: str, micro: int, accum: int, out: Path, legacy: bool = False) -> dict:
    """{"loss", "parts", "grad"} of one optimizer step of method `name` on this process group.

    legacy=True reproduces the normalisation before issue 10.3: each micro batch's loss a mean over
    its own targets, divided by accumulation x ranks (what DeepSpeed's averaging amounted to)."""
    from pipeline.methods import StepContext
    from pipeline.strategy import Strategy, agree_max, all_reduce_sum
    from pipeline.train import build_module, load_run_tokenizer, step_counts

    overrides, stage = METHODS[name]
    cfg = load_config(None, [*TINY, *overrides, f"train.per_device_train_batch_size={micro}",
                             f"train.gradient_accumulation_steps={accum}", f"train.output_dir={out / name}"])
    strategy = Strategy(cfg)
    tokenizer = load_run_tokenizer(cfg, out / name)
    module, collate, loaded = build_module(cfg, tokenizer)
    strategy.prepare(module, total_steps=1, hidden_size=loaded.hidden_size)
    per_rank = micro * accum
    mine = global_batch()[strategy.rank * per_rank:(strategy.rank + 1) * per_rank]
    batches = [collate(mine[k * micro:(k + 1) * micro], stage) for k in range(accum)]
    counts = None if legacy else step_counts(cfg, batches)
    scale = accum * strategy.world_size if legacy else 1
    totals: dict[str, float] = {}
    for k, batch in enumerate(batches):
        loss, parts = strategy.forward(batch, StepContext(agree_max=agree_max, stage=stage, counts=counts))
        strategy.backward_share(loss / scale)
        for key, value in {"loss": loss.detach(), **parts}.items():
            totals[key] = totals.get(key, 0.0) + float(value) / scale
        if k < accum - 1:
            assert not strategy.step()          # a micro step: DeepSpeed only counts it
    assert strategy.engine.is_gradient_accumulation_boundary()
    names = sorted(totals)
    summed = dict(zip(names, all_reduce_sum([totals[k] for k in names])))
    # ZeRO-0: after the boundary's backward the gradients are already averaged over ranks.
    grad = torch.cat([p.grad.detach().flatten().double() for p in strategy.engine.module.parameters()
                      if p.requires_grad])
    return {"loss": summed.pop("loss"), "parts": summed, "grad": grad}


def main(spec_file: str) -> None:
    from pipeline.strategy import get_rank, init_distributed

    spec = json.loads(Path(spec_file).read_text())
    init_distributed(timeout_s=120)
    out = Path(spec["out"])
    results = {name: one_step(name, micro=4, accum=1, out=out / "two_ranks") for name in METHODS}
    if get_rank() == 0:
        torch.save(results, out / "two_ranks.pt")


if __name__ == "__main__":
    main(sys.argv[1])
