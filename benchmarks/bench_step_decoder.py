"""SIM-CoT step decoder: one batched decoder forward+backward vs the reference's loop per latent.

    OMP_NUM_THREADS=1 python benchmarks/bench_step_decoder.py
    OMP_NUM_THREADS=1 python benchmarks/bench_step_decoder.py --hidden 128 --layers 4 --decoder full

What is compared (same model, same batch, same loss, in one run, interleaved):

* ours     -- `pipeline.methods.step_decoder.explain_loss`, the real training path: all B·n latents
              of the batch go through ONE decoder forward of shape [B·n, 1 + L] (METHODS.md, bug 3).
* loop     -- the reference's structure, written below (`loop_explain_loss`): one decoder forward
              of shape [B, 1 + L_k] per latent k in a Python loop, each padded to latent k's own
              longest target, latents without any target in the batch skipped (as the reference
              does). It computes OUR loss definition (mean CE over the (row, latent) pairs that have
              a target), so the two losses must agree to 1e-5 -- asserted -- and the latent
              gradients too. Only the batching differs.

Two levels are timed, each forward + backward, gradients cleared in between (no optimizer step,
which is the same for both):

* decoder  -- the explain loss alone, on fixed latents [B, n, d] that require grad (the stand-in
              for the projection's output);
* step     -- the whole SIM-CoT (CODI base) loss step: `simcot.run` vs `codi.run` + the loop.

The batch is real: B GSM8k-Aug training examples (tests/fixtures/gsm8k_aug_train.txt) through the
SIM-CoT collate, with step targets truncated to `--step-tokens` (L) tokens including EOS; the
tokenizer is the small fixture BPE (tests/fixtures/eval/tokenizer), the model a random tiny LLaMA
with LoRA (r=8, dropout 0, B matrices randomised so the adapters are live).

Prints a table (median ms per step, speed-up = loop / ours) and writes JSON to --out
(default runs/bench/bench_step_decoder.json).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common  # before pipeline: puts the repository root on sys.path, sets torch threads

from pipeline.config import Config, LoraConfig
from pipeline.latent import positions_from_mask
from pipeline.losses import IGNORE_INDEX, causal_lm_ce
from pipeline.methods import StepContext, codi, simcot, step_decoder


# --------------------------------------------------------------------------- options
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
common.add_size_options(parser)                                 # --hidden --layers --batch --latents
parser.add_argument("--step-tokens", type=int, default=16, help="L, max step-target tokens incl. EOS")
parser.add_argument("--decoder", nargs="+", default=["shared", "full"], choices=["shared", "full"],
                    help="decoder kinds to benchmark (shared = 2nd LoRA adapter, full = trainable copy)")
common.add_timing_options(parser, "bench_step_decoder")         # --repeats --warmup --seed --out
args = parser.parse_args()


# --------------------------------------------------------------------------- the baseline
def loop_explain_loss(parts, cfg, latents, batch):
    """The reference's structure: one decoder forward per latent, [B, 1 + L_k] each.

    Same loss as step_decoder.explain_loss: per (row, latent) token-mean CE, averaged over the
    pairs that have a target. Uses the same decoder (and, for `shared`, the same adapter switch).
    """
    model, ctx, to_input = step_decoder._decoder(parts, cfg)
    device = model.get_input_embeddings().weight.device
    step_ids = batch["step_ids"].to(device)            # [B, n, L]
    step_mask = batch["step_mask"].to(device)
    has = batch["step_has_target"].to(device)          # [B, n]
    total, count = latents.new_zeros(()), has.new_zeros(())
    with ctx:
        for k in range(latents.shape[1]):
            if not bool(has[:, k].any()):              # the reference skips empty latents
                continue
            width = int(step_mask[:, k].sum(-1).max())  # latent k's own longest target
            ids, mask = step_ids[:, k, :width], step_mask[:, k, :width]
            inputs = torch.cat([to_input(latents[:, k])[:, None], model.get_input_embeddings()(ids)], dim=1)
            attn = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
            logits = model(inputs_embeds=inputs, attention_mask=attn, position_ids=positions_from_mask(attn),
                           use_cache=False).logits
            labels = torch.cat([ids.new_full((ids.shape[0], 1), IGNORE_INDEX),
                                ids.masked_fill(mask == 0, IGNORE_INDEX)], 1)
            ce = causal_lm_ce(logits, labels, reduction="none")          # [B]
            total = total + (ce * has[:, k]).sum()
            count = count + has[:, k].sum()
    return total / count.clamp(min=1)


# --------------------------------------------------------------------------- setup
def make_cfg(decoder: str) -> Config:
    cfg = Config()
    cfg.model = common.tiny_llama(args.hidden, args.layers, LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0))
    cfg.method.name = "simcot"
    cfg.method.num_latents = args.latents
    cfg.method.simcot.base = "codi"
    cfg.method.simcot.decoder = decoder
    cfg.method.simcot.max_step_tokens = args.step_tokens
    return cfg


def build(decoder: str):
    cfg = make_cfg(decoder)
    loaded, parts = common.build_with_live_lora(cfg, simcot, args.seed)
    parts.train()
    return cfg, loaded, parts


examples = common.train_examples(args.batch, args.seed)


def clear_grads(parts, latents):
    for p in parts.parameters():
        p.grad = None
    latents.grad = None


def compare(name: str, ours_fn, loop_fn, reset) -> dict:
    """Warm up, then alternate ours/loop (order flipped every repeat); median seconds each."""
    t_ours, t_loop = common.interleaved_times(ours_fn, loop_fn, reset, args.repeats, args.warmup)
    ours, loop = statistics.median(t_ours), statistics.median(t_loop)
    return {"level": name, "ours_ms": 1e3 * ours, "loop_ms": 1e3 * loop, "speedup": loop / ours,
            "ours_ms_all": [1e3 * t for t in t_ours], "loop_ms_all": [1e3 * t for t in t_loop]}


# --------------------------------------------------------------------------- run
def bench(kind: str) -> tuple[dict, dict, list[dict]]:
    """Checks and timings for one decoder kind: (shapes, checks, two table rows)."""
    cfg, loaded, parts = build(kind)
    batch = simcot.make_collate(cfg, loaded, parts)(examples)
    B, n, L = batch["step_ids"].shape
    shapes = {"B": B, "n": n, "L": L, "pairs_with_target": int(batch["step_has_target"].sum()),
              "latents_with_any_target": int(batch["step_has_target"].any(0).sum())}
    latents = torch.randn(B, n, args.hidden, generator=torch.Generator().manual_seed(args.seed + 2),
                          requires_grad=True)
    ctx = StepContext()
    weight = cfg.method.simcot.explain_weight

    # Equality: same loss (1e-5) and same latent gradient from both paths.
    clear_grads(parts, latents)
    ours_loss, _ = step_decoder.explain_loss(parts, cfg, latents, batch)
    ours_loss.backward()
    g_ours = latents.grad.clone()
    clear_grads(parts, latents)
    loop_loss = loop_explain_loss(parts, cfg, latents, batch)
    loop_loss.backward()
    g_loop = latents.grad.clone()
    loss_diff = abs(ours_loss.item() - loop_loss.item())
    grad_diff = float((g_ours - g_loop).abs().max())
    assert loss_diff <= 1e-5, f"{kind}: explain losses differ by {loss_diff:.3g}"
    assert torch.allclose(g_ours, g_loop, rtol=1e-4, atol=1e-6), f"{kind}: latent grads differ by {grad_diff:.3g}"

    step_ours = simcot.run(parts, batch, cfg, ctx).loss
    base = codi.run(parts, batch, cfg, ctx)
    step_loop = base.loss + weight * loop_explain_loss(parts, cfg, base.latents, batch)
    step_diff = abs(step_ours.item() - step_loop.item())
    assert step_diff <= 1e-5, f"{kind}: SIM-CoT step losses differ by {step_diff:.3g}"
    checks = {"decoder": kind, "explain_ours": ours_loss.item(), "explain_loop": loop_loss.item(),
              "explain_abs_diff": loss_diff, "latent_grad_max_abs_diff": grad_diff,
              "step_loss_ours": step_ours.item(), "step_loss_loop": step_loop.item(), "step_abs_diff": step_diff}

    # Timing: the explain loss alone, then the whole SIM-CoT (CODI base) step.
    def reset():
        clear_grads(parts, latents)

    def ours_decoder():
        step_decoder.explain_loss(parts, cfg, latents, batch)[0].backward()

    def loop_decoder():
        loop_explain_loss(parts, cfg, latents, batch).backward()

    def ours_step():
        simcot.run(parts, batch, cfg, ctx).loss.backward()

    def loop_step():
        out = codi.run(parts, batch, cfg, ctx)
        (out.loss + weight * loop_explain_loss(parts, cfg, out.latents, batch)).backward()

    rows = [{"decoder": kind, **compare("decoder", ours_decoder, loop_decoder, reset)},
            {"decoder": kind, **compare("step", ours_step, loop_step, reset)}]
    return shapes, checks, rows


rows, checks, shapes = [], [], {}
wall_start = time.perf_counter()
for kind in args.decoder:
    shapes, kind_checks, kind_rows = bench(kind)
    checks.append(kind_checks)
    rows += kind_rows
wall = time.perf_counter() - wall_start


# --------------------------------------------------------------------------- report
print(f"SIM-CoT step decoder: tiny LLaMA hidden={args.hidden} layers={args.layers}, "
      f"B={shapes['B']} n={shapes['n']} L={shapes['L']} "
      f"({shapes['pairs_with_target']}/{shapes['B'] * shapes['n']} (row, latent) pairs have a target; "
      f"{shapes['latents_with_any_target']}/{shapes['n']} latent columns have any), "
      f"torch threads={torch.get_num_threads()}, {args.repeats} timed steps each (median)")
print()
print("| decoder | timed | ours: 1 forward [B·n, 1+L] (ms) | loop: n forwards [B, 1+L_k] (ms) | speed-up |")
print("|---|---|---:|---:|---:|")
for r in rows:
    what = "explain loss fwd+bwd" if r["level"] == "decoder" else "whole SIM-CoT(CODI) step fwd+bwd"
    print(f"| {r['decoder']} | {what} | {r['ours_ms']:.1f} | {r['loop_ms']:.1f} | {r['speedup']:.2f}x |")
print()
for c in checks:
    print(f"check ({c['decoder']}): explain loss ours {c['explain_ours']:.6f} vs loop {c['explain_loop']:.6f} "
          f"(|diff| {c['explain_abs_diff']:.1e} <= 1e-5), latent grad max |diff| {c['latent_grad_max_abs_diff']:.1e}, "
          f"whole-step loss |diff| {c['step_abs_diff']:.1e}")
print(f"wall time {wall:.1f} s")

common.write_result(args.out, "bench_step_decoder", args, shapes=shapes, checks=checks, rows=rows, wall_s=wall)
