"""Test accuracy against training length, from study summaries of the same task run at different
`train.max_steps` (docs/RESULTS.md, issue 13: "does the gap shrink with steps?").

    python scripts/plot_steps_trend.py --out docs/study/steps_trend.png \
        400=docs/study/chain_400steps/summary.json 600=runs/ablate600/summary.json \
        1200=docs/study/chain/summary.json [--methods nocot,cot,simcot]

Each point is a method's mean over the seeds its summary holds, the bar its standard deviation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_points(pairs: list[str], methods: list[str]) -> dict[str, list[tuple[int, float, float, int]]]:
    """{method: [(steps, mean, std, seeds)]} from `STEPS=summary.json` arguments."""
    points: dict[str, list[tuple[int, float, float, int]]] = {m: [] for m in methods}
    for pair in pairs:
        steps, _, path = pair.partition("=")
        if not path:
            raise SystemExit(f"{pair!r}: expected STEPS=path/to/summary.json")
        summary = json.loads(Path(path).read_text())
        for m in methods:
            entry = summary["methods"].get(m)
            if entry and entry.get("accuracy_mean") is not None:
                points[m].append((int(steps), entry["accuracy_mean"], entry["accuracy_std"] or 0.0,
                                  len(entry["per_seed"])))
    return {m: sorted(p) for m, p in points.items() if p}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("summaries", nargs="+", help="STEPS=summary.json")
    p.add_argument("--methods", default="nocot,cot,codi,simcot")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = load_points(args.summaries, args.methods.split(","))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in points.items():
        xs, ys, es, ns = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        for x, y, n in zip(xs, ys, ns):
            ax.annotate(f"{n}s", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("training steps (batch 32)")
    ax.set_ylabel("test accuracy % (mean ± std over seeds; Ns = seeds)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    for method, pts in points.items():
        print(method, ", ".join(f"{s} steps: {m:.1f} ± {e:.1f} ({n} seeds)" for s, m, e, n in pts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
