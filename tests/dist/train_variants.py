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
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import pipeline.methods as methods  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.strategy import get_rank, init_distributed  # noqa: E402
from pipeline.train import run  # noqa: E402

# A tiny LLaMA and a few short steps: every method trains in 1-8 s per variant on one CPU thread.
TINY_OVERRIDES = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=4",
                  "model.tiny.vocab_size=500", "data.train.0.max_examples=16", "train.max_steps=3",
                  "train.logging_steps=1", "train.learning_rate=3e-3", "train.warmup_ratio=0",
                  "train.export=false", "method.num_latents=2"]
# Coconut: 8 examples = one global batch of 8 per epoch, so 3 steps walk through stages 0, 1, 2.
COCONUT = ["method.coconut.c_thought=1", "method.coconut.max_latent_stage=2", "method.coconut.epochs_per_stage=1",
           "data.train.0.max_examples=8"]
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0"]
METHOD_VARIANTS = {
    "cot": ["method.name=cot"],
    "nocot": ["method.name=nocot"],
    "coconut": ["method.name=coconut", *COCONUT],
    "codi": ["method.name=codi", *LORA],
    "simcot_full": ["method.name=simcot", "method.simcot.decoder=full"],
    "simcot_shared_coconut": ["method.name=simcot", "method.simcot.decoder=shared", "method.simcot.base=coconut",
                              *COCONUT, *LORA],
    "softcot": ["method.name=softcot", "method.softcot.num_thoughts=2", "method.softcot.assistant_model=tiny-gpt2",
                "method.softcot.target=annotations"],
}


def method_variants(template: str, micro: int) -> list[dict]:
    """Every method with the same global batch of 8: `micro` x world size x accumulation."""
    common = TINY_OVERRIDES + [f"train.per_device_train_batch_size={micro}", "deepspeed.enabled=true",
                               f"deepspeed.template={template}"]
    return [{"name": name, "overrides": common + extra} for name, extra in METHOD_VARIANTS.items()]


def asymmetric_variants(common: list[str], prefix: str = "") -> list[dict]:
    """Rank 0 gets no SIM-CoT step targets (and, on Coconut, fewer latent columns) than rank 1: the
    cases where ranks would run different forward calls unless agree_max pads the short one."""
    return [
        {"name": f"{prefix}no_steps", "rank0_no_steps": True,
         "overrides": common + ["method.name=simcot", "method.simcot.decoder=full"]},
        {"name": f"{prefix}fewer_latents", "rank0_no_steps": True, "rank0_fewer_latents": True,
         "overrides": common + ["method.name=simcot", "method.simcot.base=coconut", "method.simcot.decoder=shared",
                                *COCONUT, *LORA]},
    ]


# 500-504 are the latent special tokens (added after the 500-token BPE): their trained rows must export too.
PROBE_IDS = torch.tensor([[5, 17, 42, 99, 500, 3, 250, 11], [8, 8, 120, 504, 502, 77, 31, 400]])


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
        # Every rank runs the forward (ZeRO-3 gathers are collective). Outside the engine's forward
        # ZeRO-3 does not fetch parameters that live in never-called submodules (peft's trainable
        # token rows sit in a ParameterDict), so gather the whole LM explicitly.
        with torch.no_grad(), strategy.gathered(lm.parameters()):
            logits = lm(input_ids=PROBE_IDS.to(strategy.device)).logits.float().cpu()
        if get_rank() == 0:
            torch.save(logits, path)
    return on_end


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    init_distributed(timeout_s=120)
    # torchrun starts each rank in its own session; the SIGKILL test kills the ranks by these ids.
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / f"pid_rank{get_rank()}").write_text(str(os.getpid()))
    original = methods.build_method
    for variant in spec["variants"]:
        out = Path(spec["out"]) / variant["name"]
        methods.build_method = wrap_build(original, variant)
        cfg = load_config(None, variant["overrides"] + [f"train.output_dir={out}"])
        t0 = time.time()
        result = run(cfg, on_end=live_logits(out / "live_logits.pt") if variant.get("live_logits") else None)
        if get_rank() == 0:
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            train_log = [r for r in log if "loss" in r]                      # validation records aside
            result.update(losses=[r["loss"] for r in train_log], steps=[r["step"] for r in train_log],
                          evals=[r for r in log if "eval/accuracy" in r], seconds=time.time() - t0)
            (out / "result.json").write_text(json.dumps(result))
    methods.build_method = original


if __name__ == "__main__":
    main(sys.argv[1])
