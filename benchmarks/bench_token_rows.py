"""Trainable latent-token rows at LLaMA-8B vocabulary scale: peft's `trainable_token_indices` vs
our delta (pipeline/token_rows.py), per embedding call and per tied-head call (issue 12.4).

    OMP_NUM_THREADS=1 python benchmarks/bench_token_rows.py [--vocab 128256 --dim 4096 --dtype bf16] [--json OUT]

One LLaMA-shaped model with the real matrix size (1 layer, tiny MLP: only the embedding and head
matter here) under LoRA, the 5 latent tokens trainable, built both ways:

* peft — `LoraConfig(trainable_token_indices=...)`, what pipeline.models did before: every call
  builds a merged copy of the whole matrix and backpropagates a dense vocabulary-sized gradient;
* ours — LoRA without it, plus `add_token_rows` (a [5, d] delta added where new tokens occur).

Per call = forward + backward of the input embedding over `--tokens` ids (a few of them new
tokens), and, for a tied model, of the LM head over `--head-rows` hidden states (a latent or decode
step's last positions). Time: medians, variants interleaved in one process. Memory: peak RSS growth
during the calls, each (variant, part) in a fresh subprocess. Both variants are checked to give the
same outputs and the same gradient for the new rows.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import common  # noqa: F401  (sys.path, threads)

from pipeline.token_rows import add_token_rows, token_rows

NEW_TOKENS = 5


def build(variant: str, vocab: int, dim: int, dtype: torch.dtype, tied: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=dim, num_hidden_layers=1, num_attention_heads=max(1, dim // 128),
                      num_key_value_heads=max(1, dim // 512), intermediate_size=16, vocab_size=vocab,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).to(dtype)
    new_ids = list(range(vocab - NEW_TOKENS, vocab))
    extra = {"trainable_token_indices": {"embed_tokens": new_ids}} if variant == "peft" else {}
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], **extra))
    if variant == "ours":
        add_token_rows(model.get_base_model(), new_ids)
    return model, new_ids


def inputs(vocab: int, dim: int, dtype, tokens: int, head_rows: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - NEW_TOKENS, (tokens,), generator=g)
    ids[:: max(1, tokens // 8)] = vocab - 1 - torch.arange(len(ids[:: max(1, tokens // 8)])) % NEW_TOKENS
    hidden = torch.randn(head_rows, dim, generator=g).to(dtype)
    return ids[None], hidden


def rows_grad(model):
    """The new rows' gradient, whichever mechanism holds them."""
    ours = token_rows(model)
    if ours is not None:
        return ours.weight.grad
    for m in model.modules():
        if hasattr(m, "trainable_tokens_delta") and "default" in getattr(m, "trainable_tokens_delta", {}):
            return m.trainable_tokens_delta["default"].grad
    raise AssertionError("no trainable rows")


def call(model, part: str, ids, hidden):
    """One forward + backward of `part` (embed / head); returns the output (detached)."""
    if part == "embed":
        out = model.get_input_embeddings()(ids)
    else:
        out = model.get_output_embeddings()(hidden.requires_grad_(True))
    out.float().square().mean().backward()
    return out.detach()


def peak_rss_growth(args, variant: str, part: str) -> float:
    """Peak RSS growth (GiB) over `--calls` calls of one variant and part, in this process."""
    model, _ = build(variant, args.vocab, args.dim, common_dtype(args), part == "head")
    ids, hidden = inputs(args.vocab, args.dim, common_dtype(args), args.tokens, args.head_rows)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.calls):
        model.zero_grad(set_to_none=True)
        call(model, part, ids, hidden)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 20    # KiB → GiB


def common_dtype(args) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]


def timings(args, part: str) -> dict:
    """Median seconds per call of each variant, interleaved; checks outputs and row gradients agree."""
    dtype = common_dtype(args)
    models = {v: build(v, args.vocab, args.dim, dtype, part == "head")[0] for v in ("peft", "ours")}
    ids, hidden = inputs(args.vocab, args.dim, dtype, args.tokens, args.head_rows)
    outs, grads, times = {}, {}, {v: [] for v in models}
    for r in range(args.calls + 1):                                   # round 0: warm-up
        for v in (list(models) if r % 2 == 0 else list(models)[::-1]):
            models[v].zero_grad(set_to_none=True)
            start = time.perf_counter()
            outs[v] = call(models[v], part, ids, hidden.detach().clone())
            if r:
                times[v].append(time.perf_counter() - start)
            grads[v] = rows_grad(models[v]).float()
    torch.testing.assert_close(outs["ours"], outs["peft"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads["ours"], grads["peft"], rtol=2e-2, atol=1e-4)
    return {v: statistics.median(t) for v, t in times.items()}


def measure(vocab=128256, dim=4096, dtype="bf16", tokens=2048, head_rows=16, calls=3, memory=True) -> dict:
    """Time (and peak memory, in subprocesses) per call, peft vs ours; embed always, head (tied) too."""
    args = argparse.Namespace(vocab=vocab, dim=dim, dtype=dtype, tokens=tokens, head_rows=head_rows, calls=calls)
    result = {"vocab": vocab, "dim": dim, "dtype": dtype, "tokens_per_embed_call": tokens,
              "head_rows_per_call": head_rows, "matrix_gib": vocab * dim * common_dtype(args).itemsize / 2 ** 30,
              "parts": {}}
    for part in ("embed", "head"):
        t = timings(args, part)
        entry = {"seconds_per_call": t, "time_ratio_peft_over_ours": t["peft"] / t["ours"]}
        if memory:
            entry["peak_rss_growth_gib"] = {v: _subprocess_rss(args, v, part) for v in ("peft", "ours")}
        result["parts"][part] = entry
        print(f"bench_token_rows: {part}: {entry}", file=sys.stderr, flush=True)     # a long run shows progress
    return result


def _subprocess_rss(args, variant: str, part: str) -> float:
    cmd = [sys.executable, __file__, "--rss-of", variant, part, "--vocab", str(args.vocab), "--dim", str(args.dim),
           "--dtype", args.dtype, "--tokens", str(args.tokens), "--head-rows", str(args.head_rows),
           "--calls", str(args.calls)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def report(r: dict) -> str:
    lines = [f"Trainable token rows, {r['vocab']} x {r['dim']} {r['dtype']} matrix ({r['matrix_gib']:.2f} GiB), "
             f"{NEW_TOKENS} new tokens; embed call = {r['tokens_per_embed_call']} ids, tied head call = "
             f"{r['head_rows_per_call']} hidden rows; forward + backward, median", "",
             "| call | peft s | ours s | peft / ours | peft peak GiB | ours peak GiB |", "|---|---:|---:|---:|---:|---:|"]
    for part, e in r["parts"].items():
        mem = e.get("peak_rss_growth_gib", {})
        lines.append(f"| {part} | {e['seconds_per_call']['peft']:.3f} | {e['seconds_per_call']['ours']:.4f} | "
                     f"{e['time_ratio_peft_over_ours']:.1f}x | {mem.get('peft', float('nan')):.2f} | "
                     f"{mem.get('ours', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--tokens", type=int, default=2048, help="ids per embedding call (e.g. batch 8 x 256)")
    p.add_argument("--head-rows", type=int, default=16, help="hidden rows per tied-head call")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--rss-of", nargs=2, metavar=("VARIANT", "PART"), help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.rss_of:
        print(peak_rss_growth(args, *args.rss_of))
        return 0
    r = measure(args.vocab, args.dim, args.dtype, args.tokens, args.head_rows, args.calls, not args.no_memory)
    print(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
