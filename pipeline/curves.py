"""Training curves: `train_log.jsonl` → a PNG of the loss parts (and validation accuracy) over steps.

    python -m pipeline.curves runs/x/train_log.jsonl            # writes runs/x/train_curves.png

Every training run writes `train_curves.png` next to its log at the end (rank 0); the study puts
several runs' validation curves side by side with `plot_validation_curves`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a train_log.jsonl, in step order."""
    train, valid = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (valid if "eval/accuracy" in rec else train).append(rec)
    return train, valid


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_train_log(log_path: str | Path, out_path: str | Path, title: str | None = None) -> Path | None:
    """Loss and its named parts (left), validation accuracy and loss (right, when validated)."""
    log_path, out_path = Path(log_path), Path(out_path)
    if not log_path.is_file():
        return None
    train, valid = read_log(log_path)
    if not train and not valid:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if valid else 1, figsize=(11 if valid else 6, 4), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="loss", color="black", linewidth=2)
    for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
        ax.plot(steps, [r.get(key, float("nan")) for r in train], label=key[5:], linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if valid:
        ax = axes[0][1]
        vsteps = [r["step"] for r in valid]
        ax.plot(vsteps, [r["eval/accuracy"] for r in valid], marker="o", label="accuracy (flexible)")
        ax.plot(vsteps, [r["eval/accuracy_strict"] for r in valid], marker=".", linestyle="--",
                label="accuracy (strict)")
        best = [r for r in valid if r.get("eval/best")]
        if best:
            ax.axvline(best[-1]["step"], color="gray", linestyle=":", label=f"best (step {best[-1]['step']})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation accuracy, %")
        ax.set_ylim(0, 100)
        twin = ax.twinx()
        twin.plot(vsteps, [r["eval/loss"] for r in valid], color="tab:red", alpha=0.5, label="validation loss")
        twin.set_ylabel("validation loss", color="tab:red")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(title or str(log_path.parent.name))
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_validation_curves(runs: dict[str, list[str | Path]], out_path: str | Path) -> Path:
    """Validation accuracy over steps, one line per run, one colour per method.

    runs: {method label: [train_log.jsonl, …]} (one log per seed).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, logs) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        for j, log in enumerate(logs):
            if not Path(log).is_file():
                continue
            train, valid = read_log(log)
            kw = {"color": colour, "alpha": 0.8, "label": label if j == 0 else None}
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], **kw)
            axes[1].plot([r["step"] for r in valid], [r["eval/accuracy"] for r in valid], marker=".", **kw)
    axes[0].set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="training loss")
    axes[1].set(xlabel="optimizer step", ylabel="validation accuracy, %", ylim=(0, 100), title="validation accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)


if __name__ == "__main__":
    log = Path(sys.argv[1])
    print(plot_train_log(log, Path(sys.argv[2]) if len(sys.argv) > 2 else log.with_name("train_curves.png")))
