"""Exact loss normalisation (issue 10.3): one global batch of 8 mixing 2-step and 7-step examples
gives the same loss, parts and gradients whether it runs as 1 rank x 8, 1 rank x 4 x accumulation
2, or 2 ranks x 4 (gloo, one torchrun launch for every method), for every method.

Each loss part is a sum over targets divided by the global batch's count (tokens, rows, latents),
as transformers does with `num_items_in_batch`. The legacy check shows what this fixes: a mean per
micro batch gives the same global batch a different gradient once it is split.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from launch_env import child_env  # noqa: E402
from normalisation_steps import METHODS, global_batch, one_step  # noqa: E402

RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_same_step(got: dict, ref: dict, label: str) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), label
    assert got["parts"].keys() == ref["parts"].keys(), label
    for key, value in ref["parts"].items():
        assert got["parts"][key] == pytest.approx(value, rel=RTOL, abs=1e-7), f"{label}: {key}"
    assert rel(got["grad"], ref["grad"]) <= RTOL, f"{label}: gradient differs by {rel(got['grad'], ref['grad']):.2e}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every method's step on 2 ranks x 4, in one torchrun launch."""
    tmp = tmp_path_factory.mktemp("normalisation")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp)}))
    log = open(tmp / "two_ranks.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist" / "normalisation_steps.py"), str(spec)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("2-rank run timed out:\n" + (tmp / "two_ranks.log").read_text()[-3000:]) from None
    assert rc == 0, (tmp / "two_ranks.log").read_text()[-4000:]
    return torch.load(tmp / "two_ranks.pt", weights_only=True)


def test_global_batch_mixes_short_and_long_examples():
    steps = [len(e.steps) for e in global_batch()]
    assert steps == [2] * 4 + [7] * 4


@pytest.mark.parametrize("name", list(METHODS))
def test_one_batch_equals_accumulation_equals_two_ranks(name, two_ranks, tmp_path):
    whole = one_step(name, micro=8, accum=1, out=tmp_path / "whole")
    accumulated = one_step(name, micro=4, accum=2, out=tmp_path / "accum")
    assert_same_step(accumulated, whole, f"{name}: 1 x 4 x accumulation 2 vs 1 x 8")
    assert_same_step(two_ranks[name], whole, f"{name}: 2 ranks x 4 vs 1 x 8")
    # What the normalisation fixes: per-micro-batch means weigh the short examples' tokens more.
    legacy = one_step(name, micro=4, accum=2, out=tmp_path / "legacy", legacy=True)
    assert rel(legacy["grad"], whole["grad"]) > 1e-3, name
