"""The issue-12 benchmarks in one command: one table of figures against their targets, and a JSON summary.

    OMP_NUM_THREADS=1 python benchmarks/run.py [--json OUT] [--quick] [--only inference,token_rows]

Each benchmark is a script in this directory exposing `measure(...) -> dict`; it is imported and
called in this process (one after the other, never concurrently: the figures are ratios measured
within each benchmark's own interleaved run). A benchmark whose script is not in this checkout is
skipped with a note (bench_step.py and bench_zero3_traffic.py come from other branches), and one
that fails is reported as failed without stopping the others. A result's figures against targets
are read from its "targets" list ({what, value, target, met}) or its "target" dict
({what, ratio, met}); `--quick` asks each for its smallest meaningful run.

Exit status: 0 when every benchmark that ran met its targets, 1 otherwise (skips do not count).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name → (script module, what it measures, keyword arguments for --quick where its measure() takes them)
BENCHMARKS = {
    "step": ("bench_step", "step time of CODI / SIM-CoT vs CoT-SFT (tiny LLaMA, SmolLM2)",
             {"quick": True}),
    "zero3_traffic": ("bench_zero3_traffic", "ZeRO-3 all-gathered bytes per step vs CoT-SFT (2 CPU ranks)",
                      {"hidden": 64, "layers": 2, "steps": 1, "warmup": 2, "quick": True}),
    "inference": ("bench_inference", "latent vs explicit-CoT decoding, examples/s", {"quick": True}),
    "token_rows": ("bench_token_rows", "trainable latent-token rows: peft copy vs delta, per call",
                   {"vocab": 32768, "dim": 4096, "memory": False, "calls": 2}),
}


def call_measure(module, quick_kwargs: dict | None) -> dict:
    """measure() with those quick arguments it accepts (benchmarks from other branches differ)."""
    params = inspect.signature(module.measure).parameters
    return module.measure(**{k: v for k, v in (quick_kwargs or {}).items() if k in params})


def run_one(name: str, quick: bool) -> dict:
    module_name, what, quick_kwargs = BENCHMARKS[name]
    if not (HERE / f"{module_name}.py").is_file():
        return {"status": "skipped", "what": what,
                "note": f"benchmarks/{module_name}.py is not in this checkout (written in another branch)"}
    start = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
        if not hasattr(module, "measure"):
            return {"status": "skipped", "what": what, "note": f"{module_name}.py has no measure() function"}
        result = call_measure(module, quick_kwargs if quick else None)
    except (Exception, SystemExit) as e:        # noqa: BLE001 -- one broken benchmark must not stop the rest
        return {"status": "failed", "what": what, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-3000:], "seconds": time.perf_counter() - start}
    return {"status": "ran", "what": what, "targets": targets_of(result), "result": result,
            "seconds": time.perf_counter() - start}


def targets_of(result: dict) -> list[dict]:
    """The {what, value, target, met} rows of a result, from "targets" or a single "target"."""
    rows = list(result.get("targets") or [])
    single = result.get("target")
    if isinstance(single, dict) and "what" in single:
        rows.append({"what": single["what"], "value": single.get("value", single.get("ratio")),
                     "target": single.get("target", ""), "met": single.get("met")})
    return rows


def figures_of(name: str, result: dict) -> list[tuple[str, str]]:
    """Headline figures that are not targets, per benchmark (for the table)."""
    if name == "inference":
        return [(f"latent / CoT examples/s, batch {bs}", f"{v:.2f}x")
                for bs, v in result.get("speedup_latent_over_cot", {}).items()]
    if name == "token_rows":
        out = []
        for part, e in result.get("parts", {}).items():
            out.append((f"token rows {result['vocab']}x{result['dim']} {result['dtype']}, {part} call: peft / ours time",
                        f"{e['time_ratio_peft_over_ours']:.1f}x"))
            mem = e.get("peak_rss_growth_gib")
            if mem:
                out.append((f"token rows, {part} call: peak memory peft / ours", f"{mem['peft']:.2f} / {mem['ours']:.2f} GiB"))
        return out
    return []


def table(summary: dict) -> str:
    lines = ["| benchmark | figure | value | target | met |", "|---|---|---:|---|---|"]
    for name, entry in summary["benchmarks"].items():
        if entry["status"] != "ran":
            note = entry.get("note") or entry.get("error", "")
            lines.append(f"| {name} | {entry['what']} | {entry['status']} | {note[:90]} | - |")
            continue
        for what, value in figures_of(name, entry["result"]):
            lines.append(f"| {name} | {what} | {value} | | |")
        for t in entry["targets"]:
            value = t["value"]
            shown = f"{value:.2f}x" if isinstance(value, (int, float)) else str(value)
            lines.append(f"| {name} | {t['what']} | {shown} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write the summary (every benchmark's full result) here")
    p.add_argument("--quick", action="store_true", help="each benchmark's smallest meaningful run")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"--only: unknown {unknown}; choose from {', '.join(BENCHMARKS)}")
    summary = {"quick": args.quick, "benchmarks": {}}
    for name in names:
        print(f"== {name}: {BENCHMARKS[name][1]}", flush=True)
        summary["benchmarks"][name] = run_one(name, args.quick)
    ran = [e for e in summary["benchmarks"].values() if e["status"] == "ran"]
    summary["all_targets_met"] = all(t["met"] for e in ran for t in e["targets"])
    summary["failed"] = [n for n, e in summary["benchmarks"].items() if e["status"] == "failed"]
    print()
    print(table(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0 if summary["all_targets_met"] and not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
