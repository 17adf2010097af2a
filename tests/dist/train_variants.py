"""Run several training variants in one process group (torchrun or plain python), for the engine tests.

    torchrun --standalone --nproc_per_node 2 tests/dist/train_variants.py SPEC.json

SPEC.json: {"out": DIR, "variants": [{"name", "overrides": [...], optional "live_logits": true,
"rank0_no_steps": true, "rank0_fewer_latents": true, "sleep_s": 0.3}]}. Each variant trains with
`pipeline.train.run` into DIR/<name>; rank 0 writes DIR/<name>/result.json (run summary + the loss
of every logged step) and, with live_logits, DIR/<name>/live_logits.pt from the live (possibly
ZeRO-3-partitioned) model. The rank0_* switches make rank 0's batches differ from rank 1's the way
real data can (no SIM-CoT step targets; fewer latent columns), to test rank symmetry.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import pipeline.methods as methods  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.strategy import get_rank, init_distributed  # noqa: E402
from pipeline.train import run  # noqa: E402

PROBE_IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [8, 8, 120, 64, 2, 77, 31, 400]])


def wrap_build(original, variant: dict):
    """build_method with rank 0's collate (and loss step) altered as the variant asks."""
    def build(cfg, loaded):
        module, collate = original(cfg, loaded)

        def collate_rank0(examples, stage=0):
            if variant.get("rank0_no_steps"):
                examples = [dataclasses.replace(ex, steps=()) for ex in examples]
            batch = collate(examples, stage)
            if variant.get("rank0_fewer_latents") and "latent_active" in batch:
                batch["latent_active"] = batch["latent_active"][:, :1]
                for key in ("step_ids", "step_mask", "step_has_target"):
                    if key in batch:
                        batch[key] = batch[key][:, :1] * 0
            return batch

        if variant.get("sleep_s"):
            loss_fn = module._loss_fn

            def slow(*args):
                time.sleep(variant["sleep_s"])
                return loss_fn(*args)
            module._loss_fn = slow
        return module, (collate_rank0 if get_rank() == 0 else collate)
    return build


def live_logits(path: Path):
    def on_end(strategy, tokenizer):
        lm = strategy.engine.module.parts["lm"]
        with torch.no_grad():      # every rank runs the forward: ZeRO-3 gathers are collective
            logits = lm(input_ids=PROBE_IDS.to(strategy.device)).logits.float().cpu()
        if get_rank() == 0:
            torch.save(logits, path)
    return on_end


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    init_distributed(timeout_s=120)
    original = methods.build_method
    for variant in spec["variants"]:
        out = Path(spec["out"]) / variant["name"]
        methods.build_method = wrap_build(original, variant)
        cfg = load_config(None, variant["overrides"] + [f"train.output_dir={out}"])
        t0 = time.time()
        result = run(cfg, on_end=live_logits(out / "live_logits.pt") if variant.get("live_logits") else None)
        if get_rank() == 0:
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            result.update(losses=[r["loss"] for r in log], steps=[r["step"] for r in log],
                          seconds=time.time() - t0)
            (out / "result.json").write_text(json.dumps(result))
    methods.build_method = original


if __name__ == "__main__":
    main(sys.argv[1])
