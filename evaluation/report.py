"""Reports of a run: ``results.json``, a Markdown table (with published numbers), PNG plots.

:func:`build_results` makes the one results dict of a run (config, git commit, package versions,
seeds, per-benchmark accuracy mean ± std); :func:`write_all` renders one or several of them, so
``latent-eval report RUN_A RUN_B --out cmp/`` puts several methods side by side.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from pathlib import Path

from evaluation.published import PUBLISHED_STD, canonical_method, canonical_model, lookup

__all__ = ["build_results", "write_all", "markdown_table", "plot_accuracy_by_benchmark",
           "plot_accuracy_vs_latents", "load_results", "git_commit", "package_versions"]


def git_commit(path: Path | None = None) -> dict:
    """HEAD commit and dirty flag of the checkout holding this package (None outside git)."""
    cwd = str(path or Path(__file__).resolve().parents[1])
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip() if head.returncode == 0 else None,
            "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def package_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("latent-cot-pipeline", "torch", "transformers", "tokenizers", "peft", "numpy", "datasets",
                 "flash-attn", "deepspeed"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_results(adapter, cfg, benchmarks, rows: list[dict], latent_counts: list) -> dict:
    """The results dict of one run (what ``results.json`` holds)."""
    from dataclasses import asdict

    method, model = adapter.method, adapter.model_name
    for row in rows:
        row["published"] = lookup(model, method, row["benchmark"])
        std = PUBLISHED_STD.get((canonical_model(model), canonical_method(method), row["benchmark"]))
        if std is not None:
            row["published_std"] = std
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": method, "model": model,
        "config": {"run": json.loads(json.dumps(asdict(cfg), default=str)),
                   "adapter": json.loads(json.dumps(adapter.describe(), default=str))},
        "git": git_commit(), "versions": package_versions(),
        "seeds": list(cfg.seeds), "num_latents": latent_counts,
        "benchmarks": {b.name: {"path": b.path, "n": len(b.instances)} for b in benchmarks},
        "results": rows,
    }


def load_results(path: str | Path) -> dict:
    path = Path(path)
    return json.loads((path / "results.json" if path.is_dir() else path).read_text())


# --------------------------------------------------------------------------- Markdown
def _pm(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _num(x, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown_table(runs: list[dict]) -> str:
    """One row per (run, benchmark, latent count); per-seed accuracies in a second table."""
    head = ("| benchmark | method | model | latents | n | seeds | strict acc. | flexible acc. | published "
            "| tokens (incl. latents) | examples/s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines, seed_lines = [head], ["| benchmark | method | latents | seed | strict | flexible | tokens | examples/s |",
                                 "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["results"]:
            pub = _num(r.get("published"), ".2f" if r.get("published_std") else ".1f")
            if r.get("published_std"):
                pub += f" ± {r['published_std']:.2f}"
            lat = "–" if r["num_latents"] is None else str(r["num_latents"])
            lines.append(f"| {r['benchmark']} | {run['method']} | {run['model']} | {lat} | {r['n']} | "
                         f"{len(r['seeds'])} | {_pm(r['accuracy']['strict'])} | {_pm(r['accuracy']['flexible'])} | "
                         f"{pub} | {_num(r['avg_tokens_incl_latents'])} | {_num(r['examples_per_s'], '.2f')} |")
            for seed, s in r["per_seed"].items():
                cells = [_num(s.get("accuracy_strict"), ".2f"), _num(s.get("accuracy_flexible"), ".2f"),
                         _num(s.get("avg_tokens_incl_latents")), _num(s.get("examples_per_s"), ".2f")]
                seed_lines.append(" | ".join([f"| {r['benchmark']}", run["method"], lat, seed, *cells]) + " |")
    notes = ("Accuracy in %, mean ± sample std over seeds. *strict*: only a marked answer (\"The answer is:\", "
             "`####`, `\\boxed{}`); *flexible*: the last number / option / True-False in the text. "
             "*published*: the number reported for this model, method and benchmark (METHODS.md), if any.")
    return "\n".join(["# Results", "", notes, "", *lines, "", "## Per seed", "", *seed_lines, ""])


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(run: dict) -> str:
    return f"{run['method']} ({run['model']})" if run["model"] not in (run["method"], None) else run["method"]


def plot_accuracy_by_benchmark(runs: list[dict], path: Path, mode: str = "flexible") -> Path:
    """Grouped bars: benchmarks on x, one bar per run (method); error bars = std over seeds.

    For a latent sweep each run shows its largest latent count. Published numbers are black ticks.
    """
    plt = _pyplot()
    benches = list(dict.fromkeys(r["benchmark"] for run in runs for r in run["results"]))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(benches) * max(1, len(runs)) ** 0.5), 3.6))
    for k, run in enumerate(runs):
        best = {}
        for r in run["results"]:
            cur = best.get(r["benchmark"])
            if cur is None or (r["num_latents"] or 0) > (cur["num_latents"] or 0):
                best[r["benchmark"]] = r
        xs = [i + (k - (len(runs) - 1) / 2) * width for i, b in enumerate(benches) if b in best]
        rs = [best[b] for b in benches if b in best]
        ax.bar(xs, [r["accuracy"][mode]["mean"] or 0 for r in rs], width,
               yerr=[r["accuracy"][mode]["std"] or 0 for r in rs], capsize=3, label=_label(run))
        for x, r in zip(xs, rs):
            if r.get("published") is not None:
                ax.plot([x - width / 2, x + width / 2], [r["published"]] * 2, color="black", lw=2)
    ax.set_xticks(range(len(benches)), benches, rotation=20, ha="right")
    ax.set_ylabel(f"accuracy % ({mode})")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Accuracy per benchmark (black: published)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_latents(runs: list[dict], path: Path, mode: str = "flexible") -> Path | None:
    """Accuracy against latent count, one line per (run, benchmark); None if no run has latents."""
    series = {}
    for run in runs:
        for r in run["results"]:
            if r["num_latents"] is not None:
                series.setdefault((_label(run), r["benchmark"]), []).append(r)
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for (label, bench), rs in series.items():
        rs = sorted(rs, key=lambda r: r["num_latents"])
        ax.errorbar([r["num_latents"] for r in rs], [r["accuracy"][mode]["mean"] for r in rs],
                    yerr=[r["accuracy"][mode]["std"] for r in rs], marker="o", capsize=3,
                    label=f"{bench} · {label}" if len(runs) > 1 else bench)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of latents")
    ax.set_ylabel(f"accuracy % ({mode})")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("Accuracy against latent count", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: dict | list[dict], out: str | Path, plots: bool = True) -> dict[str, str]:
    """Write ``results.json`` (single run), ``results.md`` and the PNGs into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = results if isinstance(results, list) else [results]
    written = {}
    if not isinstance(results, list):
        (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
        written["results"] = str(out / "results.json")
    (out / "results.md").write_text(markdown_table(runs), encoding="utf-8")
    written["table"] = str(out / "results.md")
    if plots:
        written["accuracy_by_benchmark"] = str(plot_accuracy_by_benchmark(runs, out / "accuracy_by_benchmark.png"))
        lat = plot_accuracy_vs_latents(runs, out / "accuracy_vs_latents.png")
        if lat is not None:
            written["accuracy_vs_latents"] = str(lat)
    return written
