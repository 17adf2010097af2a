"""The runner: benchmarks × latent counts × seeds, per-sample JSONL written as it goes, then results.

Layout of one run directory::

    run_config.json                     what was asked (checked on resume)
    samples/<benchmark>/<cell>.jsonl    one line per instance, in benchmark order
    samples/.shards/…rank<r>.jsonl      per-rank files of a data-parallel run (merged by rank 0)
    results.json  results.md  accuracy_by_benchmark.png  accuracy_vs_latents.png

A *cell* is one (benchmark, latent count, seed). Lines are appended and flushed after every batch,
so an interrupted sweep resumes where it stopped: instances already in a cell's file are skipped
(a half-written last line is dropped). Data parallel: ``RANK``/``WORLD_SIZE`` from the environment
(torchrun sets them); rank ``r`` takes instances ``r, r+W, …`` and writes its own shard file; rank 0
waits until the shards cover every instance and merges them in benchmark order. No collective is
needed, so ranks may also be independent processes (``RANK=1 WORLD_SIZE=2 latent-eval run …``).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from evaluation.answers import score
from evaluation.benchmarks import Benchmark, Instance, load_benchmark

log = logging.getLogger(__name__)

__all__ = ["RunConfig", "run", "cell_name", "read_rows", "summarise_cell", "aggregate"]


@dataclass
class RunConfig:
    out_dir: str
    benchmarks: list[tuple[str, str | None]] = field(default_factory=lambda: [("gsm8k_aug", None)])
    seeds: list[int] = field(default_factory=lambda: [41])
    num_latents: list[int] | None = None      # None: the adapter's own count
    batch_size: int = 16
    limit: int | None = None
    progress: bool = True
    data_dir: str | None = None
    merge_timeout_s: float = 3600.0
    plots: bool = True


def cell_name(seed: int, num_latents: int | None) -> str:
    return f"seed{seed}" if num_latents is None else f"latents{num_latents}_seed{seed}"


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# --------------------------------------------------------------------------- sample files
def read_rows(path: Path, repair: bool = True) -> list[dict]:
    """Valid JSON lines of ``path``; a half-written line from a crash is dropped (and, with
    ``repair``, removed from the file: only the file's writer may repair it)."""
    if not path.is_file():
        return []
    rows, bad = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad = True
    if bad and repair:
        _write_rows(path, rows)
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _sample_row(bench: str, index: int, inst: Instance, gen, seed: int, num_latents, latency: float,
                rank: int) -> dict:
    s = score(gen.text, inst, gen.samples)
    row = {"benchmark": bench, "index": index, "id": inst.id, "seed": seed, "num_latents": num_latents,
           "question": inst.question, "gold": inst.gold,
           "prediction": s["prediction_flexible"], "correct": s["correct_flexible"], **s,
           "raw": gen.text, "generated_tokens": gen.num_generated_tokens, "latents_used": gen.num_latents,
           "latency_s": latency, "rank": rank, "source": inst.source}
    if gen.samples:
        row["samples"] = gen.samples
        # With several samples "correct" is the vote (self-consistency); keep the first sample's own
        # score too, so one run reports single-sample accuracy beside it.
        first = score(gen.text, inst)
        row.update({f"correct_single_{mode}": first[f"correct_{mode}"] for mode in ("strict", "flexible")})
    return row


def _generate_cell(adapter, bench: Benchmark, todo: list[tuple[int, Instance]], seed: int,
                   num_latents: int | None, batch_size: int, out: Path, rank: int, bar) -> None:
    """Generate ``todo`` in batches, appending each batch's rows to ``out`` (flushed)."""
    import torch

    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            t0 = time.perf_counter()
            gens = adapter.generate([inst for _, inst in chunk], seed, num_latents)
            per = (time.perf_counter() - t0) / len(chunk)
            if len(gens) != len(chunk):
                raise RuntimeError(f"adapter returned {len(gens)} generations for {len(chunk)} instances")
            for (index, inst), gen in zip(chunk, gens):
                row = _sample_row(bench.name, index, inst, gen, seed, num_latents, per, rank)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(chunk))


# --------------------------------------------------------------------------- metrics
def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise_cell(rows: list[dict]) -> dict:
    """Accuracy (%, both modes), tokens and throughput of one cell's rows."""
    n = len(rows)
    if n == 0:
        return {"n": 0}
    tokens = [r["generated_tokens"] for r in rows]
    latents = [r["latents_used"] for r in rows]
    per_rank: dict[int, list[dict]] = {}
    for r in rows:
        per_rank.setdefault(r.get("rank", 0), []).append(r)
    # Ranks run side by side: throughputs add up.
    eps = sum(len(rs) / max(sum(r["latency_s"] for r in rs), 1e-9) for rs in per_rank.values())
    voted = all("correct_single_strict" in r for r in rows)
    single = {f"accuracy_single_{m}": 100.0 * sum(r[f"correct_single_{m}"] for r in rows) / n
              for m in ("strict", "flexible")} if voted else {}
    return {"n": n, **single,
            "accuracy_strict": 100.0 * sum(r["correct_strict"] for r in rows) / n,
            "accuracy_flexible": 100.0 * sum(r["correct_flexible"] for r in rows) / n,
            "avg_generated_tokens": statistics.fmean(tokens), "avg_latents": statistics.fmean(latents),
            "avg_tokens_incl_latents": statistics.fmean(t + k for t, k in zip(tokens, latents)),
            "examples_per_s": eps}


def aggregate(cells: dict[tuple[str, int | None, int], dict]) -> list[dict]:
    """Per (benchmark, latent count): per-seed metrics and mean ± std over seeds."""
    groups: dict[tuple[str, int | None], dict[int, dict]] = {}
    for (bench, n_lat, seed), summary in cells.items():
        groups.setdefault((bench, n_lat), {})[seed] = summary
    out = []
    for (bench, n_lat), per_seed in groups.items():
        seeds = sorted(per_seed)

        def col(key: str, per_seed=per_seed, seeds=seeds) -> list[float]:
            return [per_seed[s][key] for s in seeds if per_seed[s].get("n")]

        voted = all("accuracy_single_strict" in per_seed[s] for s in seeds)
        single = {"accuracy_single_sample": {m: _mean_std(col(f"accuracy_single_{m}")) for m in ("strict", "flexible")},
                  "self_consistency": True} if voted else {}
        out.append({**single, "benchmark": bench, "num_latents": n_lat, "n": per_seed[seeds[0]].get("n", 0),
                    "seeds": seeds, "per_seed": {str(s): per_seed[s] for s in seeds},
                    "accuracy": {"strict": _mean_std(col("accuracy_strict")),
                                 "flexible": _mean_std(col("accuracy_flexible"))},
                    "avg_generated_tokens": _mean_std(col("avg_generated_tokens"))["mean"],
                    "avg_tokens_incl_latents": _mean_std(col("avg_tokens_incl_latents"))["mean"],
                    "examples_per_s": _mean_std(col("examples_per_s"))["mean"]})
    return out


# --------------------------------------------------------------------------- the sweep
def _normalised(obj) -> object:
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _check_run_config(out: Path, adapter, cfg: RunConfig, rank: int) -> None:
    """A run directory belongs to one model: refuse to resume another adapter's run into it."""
    path = out / "run_config.json"
    mine = _normalised({"adapter": adapter.describe(), "limit": cfg.limit})
    if path.is_file():
        theirs = json.loads(path.read_text())
        if {k: theirs.get(k) for k in mine} != mine:
            raise ValueError(f"{out} holds a run of another configuration ({path}); "
                             "use a new --out directory (or delete it)")
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**mine, "run": _normalised(asdict(cfg))}, indent=2))


def _merge(final: Path, shard_files: list[Path], expected: int, timeout: float) -> list[dict]:
    """Rows of ``final`` plus every rank's shard, in benchmark order, written back to ``final``.

    Waits (polling) until the shards cover all ``expected`` instances: other ranks may still be
    writing. Their files are only read, never repaired.
    """
    deadline = time.monotonic() + timeout
    while True:
        by_index = {r["index"]: r for r in read_rows(final)}
        for shard in shard_files:
            for r in read_rows(shard, repair=False):
                by_index.setdefault(r["index"], r)
        if len(by_index) >= expected or not shard_files:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{final}: ranks wrote {len(by_index)} of {expected} rows in {timeout:.0f} s")
        time.sleep(1.0)
    rows = [by_index[i] for i in sorted(by_index)]
    _write_rows(final, rows)
    return rows


def run(adapter, cfg: RunConfig, benchmarks: Sequence[Benchmark] | None = None) -> dict | None:
    """Run the sweep; rank 0 returns the results dict (and writes the reports), other ranks None."""
    from evaluation import report

    rank, world = _rank_world()
    out = Path(cfg.out_dir)
    _check_run_config(out, adapter, cfg, rank)
    if benchmarks is None:
        benchmarks = [load_benchmark(name, path, limit=cfg.limit, data_dir=cfg.data_dir)
                      for name, path in cfg.benchmarks]
    if adapter.default_num_latents is None:
        if cfg.num_latents:
            log.warning("adapter %s has no latents; ignoring the latent sweep", adapter.method)
        latent_counts: list[int | None] = [None]
    else:
        latent_counts = list(cfg.num_latents or [adapter.default_num_latents])

    plan = []     # (bench, n_latents, seed, final path, this rank's shard path, todo)
    for bench in benchmarks:
        for n_lat in latent_counts:
            for seed in cfg.seeds:
                name = cell_name(seed, n_lat)
                final = out / "samples" / bench.name / f"{name}.jsonl"
                shard = (final if world == 1 else
                         out / "samples" / ".shards" / bench.name / f"{name}.rank{rank}.jsonl")
                done = {r["id"] for r in read_rows(final, repair=rank == 0)} | (
                    {r["id"] for r in read_rows(shard)} if shard != final else set())
                mine = [(i, inst) for i, inst in enumerate(bench.instances) if i % world == rank]
                plan.append((bench, n_lat, seed, final, shard, [x for x in mine if x[1].id not in done]))

    total = sum(len(p[5]) for p in plan)
    bar = None
    if cfg.progress and rank == 0 and total:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="ex", desc="eval", dynamic_ncols=True)
    for bench, n_lat, seed, _final, shard, todo in plan:
        if hasattr(adapter, "set_benchmark"):
            adapter.set_benchmark(bench.name)
        if bar is not None:
            bar.set_description(f"{bench.name} {cell_name(seed, n_lat)}")
        if todo:
            _generate_cell(adapter, bench, todo, seed, n_lat, cfg.batch_size, shard, rank, bar)
    if bar is not None:
        bar.close()
    if rank != 0:
        return None

    cells = {}
    for bench, n_lat, seed, final, shard, _ in plan:
        shards = ([] if world == 1 else
                  [shard.parent / shard.name.replace(f".rank{rank}.", f".rank{r}.") for r in range(world)])
        rows = _merge(final, shards, len(bench.instances), cfg.merge_timeout_s)   # benchmark order
        if len(rows) != len(bench.instances):
            raise RuntimeError(f"{final}: {len(rows)} rows for {len(bench.instances)} instances")
        cells[(bench.name, n_lat, seed)] = summarise_cell(rows)
    results = report.build_results(adapter, cfg, benchmarks, aggregate(cells), latent_counts)
    report.write_all(results, out, plots=cfg.plots)
    return results
