"""Validation during training (`train.eval_steps`): answer accuracy and loss on `data.eval`.

The accuracy is the evaluation harness's own: the same prompts (`evaluation.adapters.prompt_for`),
the same latent generation (`pipeline.latent.generate_with_latents`, greedy, with the start/end
tokens, latent count and projection an export of this model would carry) and the same answer
parsing (`evaluation.answers.score`). So the checkpoint kept as "best" is best by the number the
harness will report, measured on a validation split (never the test split).

Multi-rank: every rank takes its slice of the validation set, padded to the same number of
batches, and every decode loop runs until all ranks' rows are done (`agree_max`), so all ranks
make the same forward calls (ZeRO-3 gathers parameters in each); counts are summed over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import Config


@dataclass
class ValidationSet:
    instances: list          # evaluation.benchmarks.Instance, for generation and scoring
    examples: list           # pipeline.data.Example, for the loss


def load_validation_set(cfg: Config) -> ValidationSet:
    """Every `data.eval` source, as harness instances (answers, kinds) and as training examples."""
    from evaluation.benchmarks import load_benchmark
    from pipeline.data.sources import read_section, resolve_file

    instances = []
    for i, src in enumerate(cfg.data.eval):
        if src.format == "hf":
            path = f"hf:{src.path}:{src.split}"
        else:
            path = str(resolve_file(src.format, src.path, src.split, f"data.eval.{i}.path"))
        bench = load_benchmark(src.format, path, limit=src.max_examples, on_malformed=cfg.data.on_malformed)
        instances += bench.instances
    return ValidationSet(instances=instances, examples=read_section(cfg, "eval").examples)


def generation_settings(cfg: Config, parts) -> dict:
    """What an export of these parts tells the harness: latent count, start/end tokens, projection."""
    from pipeline.export import latent_meta
    from pipeline.methods.batching import optional_part

    meta = latent_meta(cfg, parts, lora=None, has_step_decoder=False)
    explicit = cfg.method.name in ("cot", "nocot")
    return {"num_latents": 0 if explicit else int(meta["num_latents"]),
            "start_token": None if explicit else meta["start_token"],
            "end_token": None if explicit else meta["end_token"],
            "projection": optional_part(parts, "projection")}


def _rank_slice(items: list, rank: int, world: int, batch: int) -> tuple[list, int]:
    """This rank's items (strided) and the batch count every rank runs (the max over ranks)."""
    mine = items[rank::world]
    return mine, math.ceil(math.ceil(len(items) / world) / batch)


@torch.no_grad()
def validate(strategy, cfg: Config, tokenizer, valid: ValidationSet, collate, ctx, stage: int = 0) -> dict:
    """{"accuracy", "accuracy_strict", "loss", "n"} over the validation set; call on every rank.

    Also "predictions": {instance id: generated text} of this rank's rows (not logged; tests compare
    them with the harness's output on an export of the same model)."""
    from evaluation.adapters import prompt_for
    from evaluation.answers import score
    from pipeline.latent import generate_with_latents
    from pipeline.strategy import agree_max, all_reduce_sum

    module = strategy.engine.module
    parts = module.parts
    rank, world = strategy.rank, strategy.world_size
    bsz = cfg.eval.batch_size
    settings = generation_settings(cfg, parts)
    was_training = module.training
    module.eval()
    try:
        # ---- accuracy: the harness's generation and scoring
        mine, n_batches = _rank_slice(valid.instances, rank, world, bsz)
        correct = correct_strict = 0
        predictions: dict[str, str] = {}
        for b in range(n_batches):
            chunk = mine[b * bsz:(b + 1) * bsz]
            rows = chunk or valid.instances[:1]          # a dummy row keeps this rank's forwards in step
            gen = generate_with_latents(parts["lm"], tokenizer, [prompt_for(inst) for inst in rows],
                                        max_new_tokens=cfg.eval.max_new_tokens,
                                        all_done=lambda local: agree_max(int(not local)) == 0, **settings)
            for inst, text in zip(chunk, gen.texts):
                predictions[inst.id] = text
                s = score(text, inst)
                correct += s["correct_flexible"]
                correct_strict += s["correct_strict"]
        # ---- loss: the training objective on the validation examples
        ex_mine, n_loss = _rank_slice(valid.examples, rank, world, cfg.train.per_device_train_batch_size)
        micro = cfg.train.per_device_train_batch_size
        loss_sum, loss_batches = 0.0, 0
        for b in range(n_loss):
            chunk = ex_mine[b * micro:(b + 1) * micro]
            batch = collate(chunk or valid.examples[:1], stage)
            loss, _ = strategy.forward(batch, ctx)
            if chunk:
                loss_sum, loss_batches = loss_sum + float(loss), loss_batches + 1
    finally:
        module.train(was_training)
    total, ok, ok_strict, lsum, lcount = all_reduce_sum(
        [len(valid.instances) if rank == 0 else 0, correct, correct_strict, loss_sum, loss_batches])
    return {"accuracy": 100.0 * ok / max(total, 1), "accuracy_strict": 100.0 * ok_strict / max(total, 1),
            "loss": lsum / max(lcount, 1), "n": int(total), "predictions": predictions}


def improved(metric: str, value: float, best: float | None) -> bool:
    """Accuracy: higher is better; loss: lower. Ties keep the earlier checkpoint."""
    if best is None:
        return True
    return value > best if metric == "accuracy" else value < best
