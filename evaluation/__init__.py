"""Batched evaluation of latent and explicit chain-of-thought models (lm-evaluation-harness style).

Benchmarks build instances and parse answers; adapters generate for a batch; the runner writes
per-sample JSONL and the reports. Nothing here needs the training engine: an exported checkpoint
is loaded with :func:`pipeline.export.load_exported` and decoded with :mod:`pipeline.latent`.

    from evaluation import load_benchmark, LatentAdapter, RunConfig, run
    adapter = LatentAdapter.from_exported("runs/codi/export")
    run(adapter, RunConfig(out_dir="results/codi", benchmarks=[("gsm8k_aug", None)], seeds=[41, 42, 43]))
"""
from evaluation.adapters import (
    ConstantAdapter,
    DecodeConfig,
    ExplicitAdapter,
    Generation,
    LatentAdapter,
    OracleAdapter,
    PredictionsFileAdapter,
)
from evaluation.answers import ANSWER_PREFIX, extract, is_correct, score
from evaluation.benchmarks import BENCHMARKS, Benchmark, BenchmarkFormatError, Instance, load_benchmark
from evaluation.runner import RunConfig, run

__all__ = [
    "ANSWER_PREFIX", "BENCHMARKS", "Benchmark", "BenchmarkFormatError", "ConstantAdapter", "DecodeConfig",
    "ExplicitAdapter", "Generation", "Instance", "LatentAdapter", "OracleAdapter", "PredictionsFileAdapter",
    "RunConfig", "extract", "is_correct", "load_benchmark", "run", "score",
]
