"""The study's outputs: summary.json, results.md and PNG plots, from the finished cells.

    summary.json   {"data": …, "methods": {"<method>": {"accuracy_mean", "accuracy_std", "per_seed", …}},
                    "interpretability": {"<method>": {"per_latent": [share %, …], …}}, "gap_closed": …}
    results.md     the tables a person reads (and docs/RESULTS.md quotes)
    accuracy.png   test accuracy per method, mean ± std over seeds
    latents_1x_2x.png   each latent method at 1x and 2x its trained latent count
    curves.png     training loss and validation accuracy over steps, per method (every seed)
    interpretability.png   SIM-CoT: share of latents k whose decoded step equals reference step k
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from pipeline.study.catalogue import METHODS, StudyData


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def normalise_step(text: str | None) -> str:
    """A calculator step compared as written, ignoring spaces: "<< 3+4 = 7>>" == "<<3+4=7>>"."""
    return re.sub(r"\s+", "", text or "")


def decoded_step_shares(latents_dir: Path) -> dict | None:
    """Per latent k (that has a reference step): % of held-out problems whose step-decoder text
    equals its reference step exactly (whitespace aside), from latent_report.jsonl, which pairs
    latent k with step k // c for c latents per step."""
    path = latents_dir / "latent_report.jsonl"
    if not path.is_file():
        return None
    hits: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for lat in rec["latents"]:
            if lat["reference"] is None or lat["step_decoder"] is None:
                continue
            hits.setdefault(lat["latent"], []).append(
                int(normalise_step(lat["step_decoder"]) == normalise_step(lat["reference"])))
    if not hits:
        return None
    ks = sorted(hits)
    total = sum(sum(v) for v in hits.values())
    count = sum(len(v) for v in hits.values())
    return {"per_latent": [100.0 * statistics.fmean(hits[k]) for k in ks], "latents": ks,
            "problems_per_latent": [len(hits[k]) for k in ks], "overall": 100.0 * total / count}


def summarise(results: dict, data: StudyData, methods: list[str], out: Path, config: dict) -> dict:
    """summary.json's content from {Cell: cell result}."""
    by_method: dict[str, list[dict]] = {}
    for cell, r in sorted(results.items(), key=lambda kv: (kv[0].method, kv[0].seed)):
        by_method.setdefault(cell.method, []).append(r)
    summary = {"data": {"name": data.name, "format": data.format, "train": data.train, "valid": data.valid,
                        "test": data.test, "notes": data.notes},
               "config": config, "methods": {}, "interpretability": {}}
    for m in methods:
        rows = by_method.get(m, [])
        mean, std = _mean_std([r["accuracy"] for r in rows])
        entry = {"accuracy_mean": mean, "accuracy_std": std, "per_seed": [r["accuracy"] for r in rows],
                 "seeds": [r["seed"] for r in rows], "description": METHODS[m].description}
        strict_mean, strict_std = _mean_std([r["accuracy_strict"] for r in rows])
        entry.update(accuracy_strict_mean=strict_mean, accuracy_strict_std=strict_std,
                     best_valid_accuracy=[r.get("best_valid_accuracy") for r in rows],
                     train_seconds=[r.get("train_seconds") for r in rows])
        if rows and rows[0].get("num_latents") and METHODS[m].latent:
            m2, s2 = _mean_std([r["accuracy_2x"] for r in rows if "accuracy_2x" in r])
            entry.update(num_latents=rows[0]["num_latents"], accuracy_2x_mean=m2, accuracy_2x_std=s2)
        summary["methods"][m] = entry
        if METHODS[m].simcot:
            shares = [s for s in (decoded_step_shares(Path(out) / "runs" / m / f"seed{r['seed']}" / "latents")
                                  for r in rows) if s]
            if shares:
                width = min(len(s["per_latent"]) for s in shares)
                summary["interpretability"][m] = {
                    "per_latent": [statistics.fmean(s["per_latent"][k] for s in shares) for k in range(width)],
                    "overall": statistics.fmean(s["overall"] for s in shares), "seeds": len(shares)}
    nocot, cot = (summary["methods"].get(k, {}).get("accuracy_mean") for k in ("nocot", "cot"))
    if nocot is not None and cot is not None and cot > nocot:
        summary["gap_closed"] = {m: (e["accuracy_mean"] - nocot) / (cot - nocot)
                                 for m, e in summary["methods"].items()
                                 if e["accuracy_mean"] is not None and m not in ("nocot", "cot")}
    return summary


def _pm(mean, std) -> str:
    return "–" if mean is None else f"{mean:.1f} ± {std:.1f}"


def write_markdown(summary: dict, path: Path) -> None:
    d = summary["data"]
    lines = [f"# Latent-CoT study: {d['name']}", "",
             f"Train `{d['train']}`, model selection on `{d['valid']}`, test `{d['test']}`."]
    lines += [f"- {n}" for n in d["notes"]]
    lines += ["", "| method | test accuracy % (mean ± std) | per seed | strict % | at 2x latents % | "
              "gap closed | valid best % |", "|---|---|---|---|---|---|---|"]
    gap = summary.get("gap_closed", {})
    for m, e in summary["methods"].items():
        per_seed = ", ".join(f"{a:.1f}" for a in e["per_seed"]) or "–"
        two = _pm(e.get("accuracy_2x_mean"), e.get("accuracy_2x_std")) if "accuracy_2x_mean" in e else "–"
        valid = ", ".join("–" if v is None else f"{v:.1f}" for v in e["best_valid_accuracy"]) or "–"
        closed = f"{100 * gap[m]:.0f}%" if m in gap else "–"
        label = m + (f" (n={e['num_latents']})" if e.get("num_latents") else "")
        lines.append(f"| {label} | {_pm(e['accuracy_mean'], e['accuracy_std'])} | {per_seed} | "
                     f"{_pm(e['accuracy_strict_mean'], e['accuracy_strict_std'])} | {two} | {closed} | {valid} |")
    lines += ["", "Gap closed = (method − No-CoT) / (CoT-SFT − No-CoT), on the mean test accuracy."]
    if summary["interpretability"]:
        lines += ["", "## What the latents say (SIM-CoT step decoder, held-out test problems)", "",
                  "Share of problems whose step-decoder text of latent k equals its reference step exactly "
                  "(the whole calculator expression and result): step k, or step k // c for a model trained "
                  "with c latents per step.", ""]
        width = max(len(v["per_latent"]) for v in summary["interpretability"].values())
        lines += ["| method | " + " | ".join(f"latent {k}" for k in range(width)) + " | all |",
                  "|---|" + "---|" * (width + 1)]
        for m, v in summary["interpretability"].items():
            cells = [f"{x:.0f}%" for x in v["per_latent"]] + ["–"] * (width - len(v["per_latent"]))
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {v['overall']:.0f}% |")
    lines += ["", "Plots: `accuracy.png`, `latents_1x_2x.png`, `curves.png`, `interpretability.png`.", ""]
    path.write_text("\n".join(lines))


def write_plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.curves import plot_validation_curves

    written = []
    methods = [m for m, e in summary["methods"].items() if e["accuracy_mean"] is not None]
    if methods:
        fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 4))
        means = [summary["methods"][m]["accuracy_mean"] for m in methods]
        stds = [summary["methods"][m]["accuracy_std"] for m in methods]
        ax.bar(methods, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        for i, m in enumerate(methods):
            ax.scatter([i] * len(summary["methods"][m]["per_seed"]), summary["methods"][m]["per_seed"],
                       color="black", s=10, zorder=3)
        ax.set(ylabel="test accuracy, %", ylim=(0, 100), title=f"{summary['data']['name']}: mean ± std over seeds")
        ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=100)
        plt.close(fig)
        written.append(out / "accuracy.png")
    latent = [m for m in methods if "accuracy_2x_mean" in summary["methods"][m]]
    if latent:
        fig, ax = plt.subplots(figsize=(1.5 * len(latent) + 2, 4))
        xs = range(len(latent))
        for shift, key, label in ((-0.2, "accuracy", "1x latents"), (0.2, "accuracy_2x", "2x latents")):
            ax.bar([x + shift for x in xs], [summary["methods"][m][f"{key}_mean"] or 0 for m in latent], width=0.4,
                   yerr=[summary["methods"][m][f"{key}_std"] or 0 for m in latent], capsize=3, label=label)
        ax.set_xticks(list(xs), latent, rotation=20)
        ax.set(ylabel="test accuracy, %", ylim=(0, 100), title="trained latent count vs twice as many at inference")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latents_1x_2x.png", dpi=100)
        plt.close(fig)
        written.append(out / "latents_1x_2x.png")
    logs = {m: sorted(str(p) for p in (out / "runs" / m).glob("seed*/train_log.jsonl")) for m in methods}
    if any(logs.values()):
        written.append(plot_validation_curves(logs, out / "curves.png"))
    interp = summary["interpretability"]
    if interp:
        fig, ax = plt.subplots(figsize=(7, 4))
        for m, v in interp.items():
            ax.plot(range(len(v["per_latent"])), v["per_latent"], marker="o", label=m)
        ax.set(xlabel="latent k", ylabel="% decoded exactly as reference step k", ylim=(0, 100),
               title="SIM-CoT: latents decoded into their steps")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "interpretability.png", dpi=100)
        plt.close(fig)
        written.append(out / "interpretability.png")
    return written


def write_report(summary: dict, out: Path, plots: bool = True) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_markdown(summary, out / "results.md")
    if plots:
        write_plots(summary, out)
