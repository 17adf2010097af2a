"""What the benchmark scripts share: the setup, the fixture tokenizer and tiny LLaMA, live LoRA
adapters, a training batch, the interleaved timing loop and the JSON result file.

Importing this module puts the repository root on sys.path, sets torch's thread count from
OMP_NUM_THREADS (default 1) and silences FutureWarnings, so a script imports it before `pipeline`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
warnings.filterwarnings("ignore", category=FutureWarning)

from transformers import AutoTokenizer  # noqa: E402

from pipeline.config import LoraConfig, ModelConfig, TinyModelConfig  # noqa: E402
from pipeline.data import read_gsm8k_aug  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.tokenizer_build import FIXTURES_DIR  # noqa: E402

TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "eval" / "tokenizer"


# --------------------------------------------------------------------------- options
def add_size_options(parser: argparse.ArgumentParser) -> None:
    """--hidden, --layers, --batch, --latents: the tiny LLaMA and the batch of a training-step benchmark."""
    parser.add_argument("--hidden", type=int, default=64, help="tiny LLaMA hidden size (64-128)")
    parser.add_argument("--layers", type=int, default=2, help="tiny LLaMA layers (2-4)")
    parser.add_argument("--batch", type=int, default=8, help="B, examples per batch")
    parser.add_argument("--latents", type=int, default=6, help="n, latents per example")


def add_timing_options(parser: argparse.ArgumentParser, name: str) -> None:
    """--repeats, --warmup, --seed, and --out (default runs/bench/<name>.json)."""
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / f"{name}.json"))


# --------------------------------------------------------------------------- model and data
def fixture_tokenizer():
    """The small fixture BPE (tests/fixtures/eval/tokenizer)."""
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tiny_llama(hidden: int, layers: int, lora: LoraConfig) -> ModelConfig:
    """A random tiny LLaMA: 4 heads, MLP 2 x hidden, vocabulary 400 (the fixture tokenizer's)."""
    return ModelConfig(name_or_path="tiny-llama",
                       tiny=TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=4,
                                            intermediate_size=2 * hidden, vocab_size=400),
                       lora=lora)


def build_with_live_lora(cfg, method, seed: int):
    """Load cfg.model (seeded) with the fixture tokenizer and build `method`'s parts; LoRA B starts
    at 0, so its matrices are randomised (N(0, 0.1²), seed + 1) to make the adapters live.

    Returns (loaded, parts)."""
    torch.manual_seed(seed)
    loaded = load_model(cfg.model, fixture_tokenizer())
    parts = method.build_parts(cfg, loaded)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in parts.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return loaded, parts


def train_examples(batch: int, seed: int) -> list:
    """`batch` GSM8k-Aug training examples with a plain integer answer, sampled with `seed`."""
    examples = [e for e in read_gsm8k_aug(FIXTURES_DIR / "gsm8k_aug_train.txt").examples if e.answer.isdigit()]
    return random.Random(seed).sample(examples, batch)


# --------------------------------------------------------------------------- timing and results
def interleaved_times(first, second, reset, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """`warmup` untimed rounds of both, then `repeats` timed rounds with the order flipped every
    round (who goes first alternates); `reset()` before every call. Returns the seconds of each."""
    for _ in range(warmup):
        for fn in (first, second):
            reset()
            fn()
    t_first, t_second = [], []
    for r in range(repeats):
        order = [(first, t_first), (second, t_second)]
        for fn, sink in (order if r % 2 == 0 else order[::-1]):
            reset()
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return t_first, t_second


def write_result(path, benchmark: str, args: argparse.Namespace, **fields) -> None:
    """Write {benchmark, date, machine, args, **fields} as JSON to `path` and say so."""
    result = {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "args": vars(args), **fields}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
