"""latent-study: train every method on one task for N seeds, select on valid, test, report.

    latent-study --data chain --out runs/study                      # the shipped synthetic task, full study
    latent-study --data chain --out runs/quick --quick              # the README demo (~5 min on 2 CPU cores)
    latent-study --data DIR --out OUT --methods nocot,cot,codi,simcot --seeds 3
    latent-study --data prontoqa --out runs/prontoqa --methods nocot,cot,codi,simcot
    latent-study --data chain --out OUT -- train.max_steps=2000     # extra overrides for every cell

DIR holds train.txt, valid.txt and test.txt in GSM8k-Aug line format (`question||<<…>> … #### a`).
A rerun with the same OUT skips finished cells and resumes an interrupted one from its checkpoint.
Writes OUT/summary.json, OUT/results.md and PNG plots (see pipeline/study/report.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.study.catalogue import (COMMON, DEFAULT_METHODS, METHODS, QUICK, QUICK_METHODS, ensure_tokenizer,
                                      resolve_data)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latent-study", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default="chain", help="task directory, 'chain', 'prontoqa' or 'prosqa'")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", help=f"comma-separated, from: {', '.join(METHODS)} "
                                     f"(default: all; --quick: {','.join(QUICK_METHODS)})")
    p.add_argument("--seeds", type=int, help="seeds per method (default 3; --quick: 1)")
    p.add_argument("--only-seeds", help="comma-separated seed indices to train now (e.g. 1,2: another process "
                                        "trains seed 0 into the same --out); the report covers finished cells")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the finished cells in --out")
    p.add_argument("--quick", action="store_true", help="fewer methods and steps, one seed (the demo)")
    p.add_argument("--jobs", type=int, default=2, help="cells trained at once (the cores are split between them)")
    p.add_argument("--threads", type=int, help="threads per cell (default: the cores / --jobs); set it when "
                                               "two studies share the machine")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every cell (after --)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipeline.study.report import summarise, write_report
    from pipeline.study.runner import finished_cells, plan_cells, run_cells

    args = parse_args(sys.argv[1:] if argv is None else argv)
    methods = (args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else DEFAULT_METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    seeds = args.seeds or (1 if args.quick else 3)
    wanted = None
    if args.only_seeds:
        try:
            wanted = {int(s) for s in args.only_seeds.split(",")}
        except ValueError:
            print(f"--only-seeds {args.only_seeds!r}: expected comma-separated seed indices, e.g. 1,2", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        data = ensure_tokenizer(resolve_data(args.data, out), out)
    except FileNotFoundError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 2
    _check_overrides(data, out, args)
    config = {"methods": methods, "seeds": seeds, "quick": args.quick, "jobs": args.jobs,
              "common": {**COMMON, **(QUICK if args.quick else {})}, "overrides": args.overrides}
    (out / "study.json").write_text(json.dumps(config, indent=2, default=str))
    cells = plan_cells(methods, seeds)
    if wanted is not None:
        cells = [c for c in cells if c.seed in wanted]
    print(f"study: {len(cells)} cells ({', '.join(methods)} x {seeds} seed(s)) on {data.name} -> {out}", flush=True)
    start = time.time()
    if args.report_only:
        results = finished_cells(cells, out)
    else:
        results = run_cells(cells, data, out, quick=args.quick, jobs=args.jobs, extra=args.overrides,
                            threads=args.threads, log=lambda msg: print(msg, flush=True))
    wall = None if args.report_only else round(time.time() - start, 1)       # per-cell times are in the summary
    summary = summarise(results, data, methods, out, {**config, "wall_seconds": wall})
    write_report(summary, out, plots=not args.no_plots)
    print((out / "results.md").read_text())
    missing = [c for c in cells if c not in results]
    return 1 if missing else 0


def _check_overrides(data, out: Path, args) -> None:
    """A malformed override fails here, once, not in every cell: the first cell's config is validated."""
    from pipeline.config import ConfigError, load_config
    from pipeline.study.runner import Cell, overrides_for

    try:
        load_config(None, overrides_for(Cell("nocot", 0), data, out, args.quick, args.overrides))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
