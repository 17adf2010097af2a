"""CODI training step: teacher run once (ours) vs the reference's teacher run twice.

    OMP_NUM_THREADS=1 python benchmarks/bench_codi_teacher.py
    OMP_NUM_THREADS=1 python benchmarks/bench_codi_teacher.py --hidden 128 --layers 4 --batch 16

What is compared (same model, same batch, in one run, interleaved):

* ours       -- `pipeline.methods.codi.run`: the teacher [Q ; CoT + answer] runs ONCE, with
                gradients; its CE trains it and its hidden states, detached, are the distillation
                target (METHODS.md, CODI).
* reference  -- the reference's structure, written below (`teacher_twice_run`): the same loss,
                but the distillation target comes from a SECOND teacher forward under no_grad
                (with its own dropout masks when dropout is on).

Timed: forward + backward of the whole CODI loss (teacher, student rollout with n latents over
the KV cache, student answer, distillation), gradients cleared in between, no optimizer step (the
same for both). Models run in train mode with LoRA dropout `--lora-dropout` (0.1, the recipes').

Checks, with dropout off (eval mode):
* the target ours distils towards -- the teacher forward's hidden states at the distillation
  position, every layer, captured with a forward hook on the model -- equals a separate no_grad,
  no-dropout recomputation of the teacher (max |diff| printed, asserted <= 1e-6);
* both variants give the same total loss (asserted within 1e-5).
With dropout on (train mode), it also prints how far the reference's no_grad target lies from the
hidden states of the teacher forward that its CE trains: the mismatch running the teacher once avoids.

The batch is real: B GSM8k-Aug training examples through the CODI collate; the tokenizer is the
small fixture BPE (tests/fixtures/eval/tokenizer), the model a random tiny LLaMA with LoRA (r=8,
B matrices randomised so the adapters are live) and the CODI projection.

Prints a table (median ms per step, speed-up = reference / ours) and writes JSON to --out
(default runs/bench/bench_codi_teacher.json).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common  # before pipeline: puts the repository root on sys.path, sets torch threads

from pipeline.config import Config, LoraConfig
from pipeline.latent import embed, forward_step, positions_from_mask, rollout_latents
from pipeline.losses import layerwise_distill, reduce_tokens, token_ce
from pipeline.methods import StepContext, codi
from pipeline.methods.batching import model_device, optional_part, suffix_logits, to_device


# --------------------------------------------------------------------------- options
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
common.add_size_options(parser)                                 # --hidden --layers --batch --latents
parser.add_argument("--lora-dropout", type=float, default=0.1)
common.add_timing_options(parser, "bench_codi_teacher")         # --repeats --warmup --seed --out
args = parser.parse_args()


# --------------------------------------------------------------------------- the baseline
def _teacher_forward(lm, b):
    ids = torch.cat([b["teacher_prompt_ids"], b["teacher_suffix_ids"]], dim=1)
    mask = torch.cat([b["teacher_prompt_mask"], b["teacher_suffix_mask"]], dim=1)
    return lm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
              use_cache=False, output_hidden_states=True)


def _at(hidden_states, pos):
    rows = torch.arange(pos.shape[0], device=pos.device)
    return [h[rows, pos] for h in hidden_states]


def teacher_twice_run(parts, batch, cfg):
    """codi.run's loss, but with the reference's second, no_grad teacher forward as the target.

    Returns (loss, hidden states of the CE teacher forward at the target position, the target)."""
    cc, lm = cfg.method.codi, parts["lm"]
    b = to_device(batch, model_device(lm))
    tp = b["teacher_prompt_ids"].shape[1]
    pos = tp + b["teacher_pos"]

    teacher = _teacher_forward(lm, b)                                     # 1st run: for its CE
    t_loss, t_mask = token_ce(teacher.logits[:, tp - 1: -1], b["teacher_suffix_labels"])
    with torch.no_grad():
        teacher_h = _at(_teacher_forward(lm, b).hidden_states, pos)      # 2nd run: the target

    projection = optional_part(parts, "projection")
    _, state = forward_step(lm, embed(lm, b["student_prompt_ids"]), b["student_prompt_mask"], None)
    _, state, outs = rollout_latents(lm, state, cfg.method.num_latents, project=projection)
    student, _ = forward_step(lm, embed(lm, b["student_suffix_ids"]), b["student_suffix_mask"], state)
    s_loss, s_mask = token_ce(suffix_logits(outs[-1].logits[:, -1:], student.logits), b["student_suffix_labels"])
    student_h = _at(student.hidden_states, b["student_pos"])

    distill = layerwise_distill(student_h, teacher_h, kind=cc.distill_loss,
                                normalize_by_teacher_std=cc.normalize_by_teacher_std)
    loss = cc.alpha * reduce_tokens(s_loss, s_mask) + cc.beta * distill + cc.gamma * reduce_tokens(t_loss, t_mask)
    return loss, [h.detach() for h in _at(teacher.hidden_states, pos)], teacher_h


# --------------------------------------------------------------------------- setup
cfg = Config()
cfg.model = common.tiny_llama(args.hidden, args.layers,
                              LoraConfig(enabled=True, r=8, alpha=16, dropout=args.lora_dropout))
cfg.method.name = "codi"
cfg.method.num_latents = args.latents

loaded, parts = common.build_with_live_lora(cfg, codi, args.seed)
examples = common.train_examples(args.batch, args.seed)
batch = codi.make_collate(cfg, loaded, parts)(examples)
ctx = StepContext()
lm = parts["lm"]
tp = batch["teacher_prompt_ids"].shape[1]
target_pos = tp + batch["teacher_pos"]
shapes = {"B": args.batch, "n": args.latents,
          "teacher_len": int(batch["teacher_prompt_ids"].shape[1] + batch["teacher_suffix_ids"].shape[1]),
          "student_prompt_len": int(batch["student_prompt_ids"].shape[1]),
          "student_suffix_len": int(batch["student_suffix_ids"].shape[1])}


def ours_target(parts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run codi.run; capture the target it distils towards: the teacher is its first lm call (two
    passes), or its second (question once: CoT + answer on a branch of the question's cache)."""
    calls = []
    handle = lm.register_forward_hook(lambda mod, inp, out: calls.append(out))
    try:
        out = codi.run(parts, batch, cfg, ctx)
    finally:
        handle.remove()
    if cfg.method.codi.shared_question_pass:
        return out.loss, [h.detach() for h in _at(calls[1].hidden_states, batch["teacher_pos"])]
    return out.loss, [h.detach() for h in _at(calls[0].hidden_states, target_pos)]


# --------------------------------------------------------------------------- checks
parts.eval()                                                # dropout off
ours_loss, ours_h = ours_target(parts)
with torch.no_grad():
    recomputed = _at(_teacher_forward(lm, batch).hidden_states, target_pos)
target_diff = max(float((a - b).abs().max()) for a, b in zip(ours_h, recomputed))
ref_loss, _, _ = teacher_twice_run(parts, batch, cfg)
loss_diff = abs(ours_loss.item() - ref_loss.item())
assert target_diff <= 1e-6, f"our distillation target differs from a no-dropout recomputation by {target_diff:.3g}"
assert loss_diff <= 1e-5, f"losses differ without dropout by {loss_diff:.3g}"

parts.train()                                               # dropout on (LoRA dropout)
torch.manual_seed(args.seed + 3)
_, ce_run_h, ref_target = teacher_twice_run(parts, batch, cfg)
mismatch = [float((a - b).abs().max()) for a, b in zip(ce_run_h, ref_target)]
mismatch_rel = [float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(ce_run_h, ref_target)]
checks = {"eval_target_vs_recompute_max_abs_diff": target_diff, "eval_loss_ours": ours_loss.item(),
          "eval_loss_reference": ref_loss.item(), "eval_loss_abs_diff": loss_diff,
          "train_reference_target_vs_ce_run_max_abs_diff_per_layer": mismatch,
          "train_reference_target_vs_ce_run_rel_l2_per_layer": mismatch_rel}


# --------------------------------------------------------------------------- timing
def clear_grads():
    for p in parts.parameters():
        p.grad = None


def ours_step():
    codi.run(parts, batch, cfg, ctx).loss.backward()


def reference_step():
    teacher_twice_run(parts, batch, cfg)[0].backward()


wall_start = time.perf_counter()
t_ours, t_ref = common.interleaved_times(ours_step, reference_step, clear_grads, args.repeats, args.warmup)
wall = time.perf_counter() - wall_start
ours_ms, ref_ms = 1e3 * statistics.median(t_ours), 1e3 * statistics.median(t_ref)


# --------------------------------------------------------------------------- report
print(f"CODI step: tiny LLaMA hidden={args.hidden} layers={args.layers}, B={args.batch} n={args.latents}, "
      f"teacher seq {shapes['teacher_len']} tokens, student prompt {shapes['student_prompt_len']} + "
      f"{args.latents} latents + suffix {shapes['student_suffix_len']}, LoRA dropout {args.lora_dropout}, "
      f"torch threads={torch.get_num_threads()}, {args.repeats} timed steps each (median)")
print()
print("| variant | teacher forwards | fwd+bwd per step (ms) | speed-up |")
print("|---|---:|---:|---:|")
print(f"| ours (codi.run) | 1 (with grad) | {ours_ms:.1f} | {ref_ms / ours_ms:.2f}x |")
print(f"| reference (teacher twice) | 2 (grad + no_grad) | {ref_ms:.1f} | 1.00x |")
print()
print(f"check (dropout off): our distillation target vs a no_grad, no-dropout recomputation: "
      f"max |diff| {target_diff:.1e} (<= 1e-6); loss ours {ours_loss.item():.6f} vs reference "
      f"{ref_loss.item():.6f} (|diff| {loss_diff:.1e} <= 1e-5)")
print(f"dropout {args.lora_dropout} (train mode): the reference's no_grad target vs the hidden states its CE "
      f"trains: max |diff| per layer {', '.join(f'{m:.2e}' for m in mismatch)}; relative L2 "
      f"{', '.join(f'{m:.1%}' for m in mismatch_rel)} (ours: 0 by construction)")
print(f"timing wall time {wall:.1f} s")

common.write_result(args.out, "bench_codi_teacher", args, shapes=shapes, checks=checks,
                    ours_ms=ours_ms, reference_ms=ref_ms, speedup=ref_ms / ours_ms,
                    ours_ms_all=[1e3 * t for t in t_ours], reference_ms_all=[1e3 * t for t in t_ref], wall_s=wall)
