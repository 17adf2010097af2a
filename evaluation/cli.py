"""``latent-eval``: evaluate exported checkpoints and HF models on reasoning benchmarks.

Examples::

    # an exported CODI checkpoint on GSM8k-Aug and the out-of-domain sets, 3 seeds, 2 latent counts
    latent-eval run --adapter latent --model runs/codi/export --benchmarks gsm8k_aug,gsm_hard,svamp \\
        --seeds 41-43 --num-latents 3,6 --batch-size 64 --out results/codi
    # any instruct model, zero-shot with its chat template, sampled over 5 seeds
    latent-eval run --adapter explicit --model HuggingFaceTB/SmolLM2-135M-Instruct --chat-template \\
        --instruction 'End with "The answer is: <number>".' --do-sample --seeds 41-45 --limit 200 --out r/smol
    # validate every loader and parser (expect 100 %)
    latent-eval run --adapter oracle --benchmarks all --out /tmp/oracle
    # score an existing predictions JSONL; your own benchmark file in a shipped format
    latent-eval run --adapter predictions --predictions preds.jsonl --benchmarks multiarith=MultiArith.json --out r/p
    # data parallel on 8 GPUs (each rank a shard; rank 0 merges)
    torchrun --nproc-per-node 8 -m evaluation.cli run --adapter latent --model EXPORT --dtype bf16 --out r/x
    # side-by-side table and plots of several runs; what the latents say
    latent-eval report results/codi results/simcot --out results/compare
    latent-eval latent-report --model runs/simcot/export --benchmark prosqa --n 5 --out results/latents
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from evaluation.benchmarks import (BENCHMARKS, BenchmarkFormatError, default_data_dir, load_benchmark,
                                   parse_benchmark_specs)

__all__ = ["main", "parse_int_list", "build_adapter", "build_parser"]


def parse_int_list(text: str | None) -> list[int] | None:
    """``"41-45"`` → [41 … 45]; ``"0,2,4-6"`` → [0, 2, 4, 5, 6]."""
    if text is None:
        return None
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        if sep:
            if int(hi) < int(lo):
                raise argparse.ArgumentTypeError(f"empty range {part!r}")
            out += list(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def build_adapter(args):
    from evaluation import adapters as A

    decode = A.DecodeConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p, num_samples=args.num_samples)
    device, kind = _device(args.device), args.adapter
    if kind == "oracle":
        return A.OracleAdapter()
    if kind == "constant":
        answers = dict(item.split("=", 1) for item in args.constant.split(",")) if "=" in args.constant \
            else args.constant
        return A.ConstantAdapter(answers)
    if kind == "predictions":
        if not args.predictions:
            sys.exit("--adapter predictions needs --predictions FILE.jsonl")
        return A.PredictionsFileAdapter(args.predictions, method=args.method or "predictions",
                                        model_name=args.model_name)
    if kind == "softcot":
        from evaluation.softcot import SoftCoTAdapter

        if args.max_new_tokens is None:
            decode.max_new_tokens = 512
        if args.model and (Path(args.model) / "latent_meta.json").is_file():     # a pipeline.train export
            given = {"num_thoughts": args.num_thoughts, "assistant_placeholder": args.assistant_placeholder,
                     "base_placeholder": args.base_placeholder, "begin": args.begin, "end": args.end,
                     "instruction": args.instruction,
                     "initial_tokens": args.initial_tokens.split(",") if args.initial_tokens else None}
            adapter = SoftCoTAdapter.from_exported(args.model, dtype=args.dtype, device=device, decode=decode,
                                                   model_name=args.model_name or args.model,
                                                   **{k: v for k, v in given.items() if v is not None})
        elif not (args.assistant and args.model and args.projection):
            sys.exit("--adapter softcot needs --model EXPORT_DIR, or --assistant, --model (the base) and --projection")
        else:
            adapter = SoftCoTAdapter.from_pretrained(
                args.assistant, args.model, args.projection, dtype=args.dtype, device=device, attn=args.attn,
                num_thoughts=4 if args.num_thoughts is None else args.num_thoughts,
                assistant_placeholder=args.assistant_placeholder, base_placeholder=args.base_placeholder,
                begin=args.begin or "", end=args.end or "",
                initial_tokens=args.initial_tokens.split(",") if args.initial_tokens else None,
                instruction=args.instruction or "", chat_template=not args.no_chat_template_softcot,
                decode=decode, model_name=args.model_name or args.model)
    elif not args.model:
        sys.exit(f"--adapter {kind} needs --model")
    elif kind == "latent":
        if args.max_new_tokens is None:
            decode.max_new_tokens = 64
        adapter = A.LatentAdapter.from_exported(args.model, dtype=args.dtype, device=device, attn=args.attn,
                                                decode=decode, model_name=args.model_name)
    else:
        if args.max_new_tokens is None:
            decode.max_new_tokens = 256
        adapter = A.ExplicitAdapter.from_pretrained(
            args.model, dtype=args.dtype, device=device, attn=args.attn, method=args.method or "cot",
            chat_template=args.chat_template, system=args.system, instruction=args.instruction, decode=decode,
            model_name=args.model_name or args.model)
    if args.method:
        adapter.method = args.method
    return adapter


def _cmd_run(args) -> int:
    from evaluation.runner import RunConfig, run

    cfg = RunConfig(out_dir=args.out, benchmarks=parse_benchmark_specs(args.benchmarks + args.benchmark),
                    seeds=parse_int_list(args.seeds), num_latents=parse_int_list(args.num_latents),
                    batch_size=args.batch_size, limit=args.limit, progress=not args.no_progress,
                    data_dir=args.data_dir, plots=not args.no_plots)
    # Benchmarks first: a missing or malformed file fails before a model is loaded.
    benchmarks = [load_benchmark(name, path, limit=cfg.limit, data_dir=cfg.data_dir, on_malformed=args.on_malformed)
                  for name, path in cfg.benchmarks]
    if args.on_malformed == "skip" and int(os.environ.get("RANK", "0")) == 0:
        skipped = [line for b in benchmarks for line in b.skipped]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "skipped_examples.txt").write_text("".join(line + "\n" for line in skipped))
        print(f"{len(skipped)} malformed benchmark records skipped, listed in {Path(args.out, 'skipped_examples.txt')}",
              file=sys.stderr)
    results = run(build_adapter(args), cfg, benchmarks)
    if results is not None:
        print(Path(args.out, "results.md").read_text())
    return 0


def _cmd_report(args) -> int:
    from evaluation.report import load_results, write_all

    runs = [load_results(p) for p in args.runs]
    written = write_all(runs if len(runs) > 1 else runs[0], args.out, plots=not args.no_plots)
    print(json.dumps(written, indent=2))
    return 0


def _cmd_latent_report(args) -> int:
    from evaluation.adapters import DecodeConfig, LatentAdapter
    from evaluation.latent_report import latent_report, write_latent_report

    (name, path), = parse_benchmark_specs([args.benchmark])
    bench = load_benchmark(name, path, limit=args.n, data_dir=args.data_dir)
    adapter = LatentAdapter.from_exported(args.model, dtype=args.dtype, device=_device(args.device),
                                          decode=DecodeConfig(max_new_tokens=args.max_new_tokens or 64))
    records = latent_report(adapter, bench.instances, top_k=args.top_k, num_latents=args.num_latents,
                            latents_per_step=args.latents_per_step)
    print(json.dumps(write_latent_report(records, args.out, f"Latent report: {args.model} on {name}"), indent=2))
    return 0


def _cmd_list(args) -> int:
    data = default_data_dir() if args.data_dir is None else args.data_dir
    for name, spec in BENCHMARKS.items():
        path = f"{data}/{spec.default_path}" if spec.default_path else "(no shipped file: NAME=PATH)"
        present = "" if not spec.default_path else (" ok" if os.path.isfile(path) else " MISSING")
        print(f"{name:14s} {path}{present}   hf: {spec.hf or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latent-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="evaluate a model on benchmarks × seeds × latent counts")
    r.add_argument("--adapter", required=True,
                   choices=["latent", "explicit", "softcot", "oracle", "constant", "predictions"])
    r.add_argument("--model", help="export dir (latent), HF name/path (explicit), base model (softcot)")
    r.add_argument("--benchmarks", action="append", default=[],
                   help="comma-separated names, NAME=PATH, NAME=hf:owner/ds[:config]:split, or 'all'")
    r.add_argument("--benchmark", action="append", default=[], help="one NAME[=PATH] (repeatable)")
    r.add_argument("--seeds", default="41", help="e.g. 41-45 or 41,42")
    r.add_argument("--num-latents", help="latent counts to sweep, e.g. 0,2,4-6 (default: the checkpoint's)")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--limit", type=int, help="first N instances of each benchmark")
    r.add_argument("--max-new-tokens", type=int)
    r.add_argument("--do-sample", action="store_true")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--num-samples", type=int, default=1, help="> 1: self-consistency majority vote")
    r.add_argument("--chat-template", action="store_true", help="explicit: wrap the question as a user turn")
    r.add_argument("--system")
    r.add_argument("--instruction", help="text after the question (explicit) / before it (softcot)")
    r.add_argument("--method", help="label for reports / published lookup (cot, nocot, codi, …)")
    r.add_argument("--model-name", help="label for reports / published lookup (e.g. meta-llama/Llama-3.2-1B)")
    r.add_argument("--constant", default="numeric=0,choice=A,bool=True", help="constant adapter answers")
    r.add_argument("--predictions", help="predictions JSONL (adapter predictions)")
    r.add_argument("--assistant", help="softcot: assistant model")
    r.add_argument("--projection", help="softcot: projection safetensors")
    r.add_argument("--num-thoughts", type=int, help="softcot: thoughts per set (default: the export's, else 4)")
    r.add_argument("--initial-tokens", help="softcot++: comma-separated initial tokens, one per thought set")
    r.add_argument("--assistant-placeholder")
    r.add_argument("--base-placeholder")
    r.add_argument("--begin", help="softcot: token before the thoughts (default: the export's, else none)")
    r.add_argument("--end", help="softcot: token after the thoughts (default: the export's, else none)")
    r.add_argument("--no-chat-template-softcot", action="store_true")
    r.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    r.add_argument("--device", default="auto")
    r.add_argument("--attn", default="auto", help="auto (flash-attention-2 when usable), sdpa, eager")
    r.add_argument("--data-dir", help=f"benchmark files (default {default_data_dir()})")
    r.add_argument("--out", required=True)
    r.add_argument("--on-malformed", choices=["error", "skip"], default="error",
                   help="skip: leave malformed benchmark records out, listed in OUT/skipped_examples.txt")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--no-plots", action="store_true")
    r.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="table and plots from one or more run directories")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--out", required=True)
    rep.add_argument("--no-plots", action="store_true")
    rep.set_defaults(func=_cmd_report)

    lr = sub.add_parser("latent-report", help="decode each latent of N examples")
    lr.add_argument("--model", required=True, help="exported latent checkpoint")
    lr.add_argument("--benchmark", default="gsm8k_aug", help="NAME[=PATH]")
    lr.add_argument("--n", type=int, default=5)
    lr.add_argument("--top-k", type=int, default=5)
    lr.add_argument("--num-latents", type=int)
    lr.add_argument("--latents-per-step", type=int,
                    help="latents per reference step (default: the export's latent_meta.json, else 1)")
    lr.add_argument("--max-new-tokens", type=int)
    lr.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    lr.add_argument("--device", default="auto")
    lr.add_argument("--data-dir")
    lr.add_argument("--out", required=True)
    lr.set_defaults(func=_cmd_latent_report)

    ls = sub.add_parser("list", help="benchmarks and their default files")
    ls.add_argument("--data-dir")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.cmd == "run" and not (args.benchmarks or args.benchmark):
        args.benchmarks = ["gsm8k_aug"]
    try:
        return args.func(args)
    except (BenchmarkFormatError, FileNotFoundError) as exc:   # a data problem: one line, no traceback
        print(f"data error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
