"""Run the study's cells: train (select on valid) → export → evaluate on test → decode latents.

A cell is one (method, seed). Its directory OUT/runs/<method>/seed<k>/ holds the training run
(`latent-train` output: train_log.jsonl, train_curves.png, checkpoints/, export/), `eval/` (the
harness's results at 1x and 2x the latents), `latents/` (SIM-CoT: the step decoder's text per
latent) and `cell.json`, written last: a rerun skips every cell that has it, and a cell killed
half-way resumes from its training checkpoint. Cells run as subprocesses (`--jobs` at a time,
the cores split between them); a cell that starts from CoT-SFT waits for that seed's CoT cell.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from pipeline.study.catalogue import COMMON, METHODS, QUICK, MethodSpec, StudyData

CELL_FILE = "cell.json"


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int

    def dir(self, out: Path) -> Path:
        return out / "runs" / self.method / f"seed{self.seed}"


def seed_value(index: int) -> int:
    """Training seed of the study's seed index (11 is CODI's published seed)."""
    return 11 + index


def overrides_for(cell: Cell, data: StudyData, out: Path, quick: bool, extra: list[str]) -> list[str]:
    """The dotted overrides of a cell's `latent-train` call, as separate argv items."""
    spec = METHODS[cell.method]
    # --quick's shorter schedule wins over a method's own length (Coconut's, after the CoT-SFT export).
    values: dict[str, object] = {**COMMON, **data.overrides(), **spec.overrides, **(QUICK if quick else {}),
                                 "train.seed": seed_value(cell.seed), "train.output_dir": str(cell.dir(out))}
    if spec.init:
        values[spec.init_override] = str(Cell(spec.init, cell.seed).dir(out) / "export")
    # Lists, dicts and None as JSON (which the YAML override parser reads); each override one argv item.
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) or v is None else v}"
            for k, v in values.items()] + list(extra)


def _child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _run(cmd: list[str], log: Path, threads: int) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(threads))
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:4])} … (log: {log})")


def run_cell(cell: Cell, data: StudyData, out: Path, *, quick: bool, threads: int, extra: list[str],
             latent_report_n: int = 100) -> dict:
    """Train, evaluate and (SIM-CoT) decode one cell; returns and writes its cell.json."""
    spec: MethodSpec = METHODS[cell.method]
    directory = cell.dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "study.log"
    py = sys.executable
    start = time.time()
    _run([py, "-m", "pipeline.train", *overrides_for(cell, data, out, quick, extra)], log, threads)
    train_s = time.time() - start
    metrics = json.loads((directory / "metrics.json").read_text())
    latents = json.loads((directory / "export" / "latent_meta.json").read_text()).get("num_latents") or 0
    eval_cmd = [py, "-m", "evaluation.cli", "run", "--adapter", "latent", "--model", str(directory / "export"),
                "--benchmarks", f"{data.benchmark}={data.test}", "--seeds", "41", "--batch-size", "100",
                "--method", cell.method, "--out", str(directory / "eval"), "--no-progress"]
    if spec.latent and latents:
        eval_cmd += ["--num-latents", f"{latents},{2 * latents}"]
    _run(eval_cmd, log, threads)
    if spec.simcot:
        _run([py, "-m", "evaluation.cli", "latent-report", "--model", str(directory / "export"),
              "--benchmark", f"{data.benchmark}={data.test}", "--n", str(latent_report_n),
              "--out", str(directory / "latents")], log, threads)
    result = {"method": cell.method, "seed": cell.seed, "train_seed": seed_value(cell.seed),
              "num_latents": latents, "train_seconds": round(train_s, 1),
              "total_seconds": round(time.time() - start, 1), "best_step": metrics.get("best_step"),
              "best_valid_accuracy": metrics.get("best_accuracy"), "steps": metrics.get("step"),
              **read_accuracies(directory / "eval", latents if spec.latent else None)}
    (directory / CELL_FILE).write_text(json.dumps(result, indent=2))
    return result


def read_accuracies(eval_dir: Path, latents: int | None) -> dict:
    """{"accuracy": flexible % at the trained latent count, "accuracy_strict", "accuracy_2x"}."""
    rows = json.loads((eval_dir / "results.json").read_text())["results"]
    by_n = {r["num_latents"]: r for r in rows}
    main = by_n.get(latents) if latents else rows[0]
    out = {"accuracy": main["accuracy"]["flexible"]["mean"], "accuracy_strict": main["accuracy"]["strict"]["mean"]}
    if latents and 2 * latents in by_n:
        out["accuracy_2x"] = by_n[2 * latents]["accuracy"]["flexible"]["mean"]
    return out


def plan_cells(methods: list[str], seeds: int) -> list[Cell]:
    """Every (method, seed), with the CoT cells a method starts from added when not asked for."""
    needed = list(methods)
    for m in methods:
        init = METHODS[m].init
        if init and init not in needed:
            needed.insert(0, init)
    return [Cell(m, s) for s in range(seeds) for m in needed]


def finished_cells(cells: list[Cell], out: Path) -> dict[Cell, dict]:
    """{cell: its cell.json} for the cells that finished (a cell writes cell.json last)."""
    done = {cell: cell.dir(out) / CELL_FILE for cell in cells}
    return {cell: json.loads(path.read_text()) for cell, path in done.items() if path.is_file()}


def run_cells(cells: list[Cell], data: StudyData, out: Path, *, quick: bool, jobs: int, extra: list[str],
              threads: int | None = None, log=print) -> dict[Cell, dict]:
    """Run what is not finished, `jobs` at a time, dependencies first; finished cells are read back."""
    results = finished_cells(cells, out)
    todo = [cell for cell in cells if cell not in results]
    if results:
        log(f"{len(results)} finished cells found in {out}; {len(todo)} to run")
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    t0 = time.time()
    running: dict[Future, Cell] = {}
    failed: dict[Cell, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while todo or running:
            for cell in list(todo):
                if len(running) >= jobs:
                    break
                init = METHODS[cell.method].init
                dep = Cell(init, cell.seed) if init else None
                if dep is not None and dep in failed:
                    failed[cell] = f"needs {dep.method} seed {dep.seed}, which failed"
                    todo.remove(cell)
                    continue
                if dep is not None and dep not in results:
                    continue
                todo.remove(cell)
                log(f"[{time.time() - t0:6.0f}s] start {cell.method} seed {cell.seed}")
                running[pool.submit(run_cell, cell, data, out, quick=quick, threads=threads, extra=extra)] = cell
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                cell = running.pop(fut)
                try:
                    results[cell] = fut.result()
                    r = results[cell]
                    log(f"[{time.time() - t0:6.0f}s] done  {cell.method} seed {cell.seed}: test accuracy "
                        f"{r['accuracy']:.1f}% (valid best {r['best_valid_accuracy']}, {r['train_seconds']:.0f}s)")
                except Exception as exc:        # one failed cell must not lose the others
                    failed[cell] = str(exc)
                    log(f"[{time.time() - t0:6.0f}s] FAILED {cell.method} seed {cell.seed}: {exc}")
    for cell, why in failed.items():
        log(f"not run: {cell.method} seed {cell.seed}: {why}")
    return results
