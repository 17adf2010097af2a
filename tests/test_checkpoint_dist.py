"""Checkpoints on 2 CPU ranks (gloo) under ZeRO-2 and ZeRO-3 (issue 10.1, 10.2): both ranks' files
in one manifest; a damaged partition of rank 1 (and a half-written temp dir) falls back to the
previous checkpoint and resumes exactly; a planted pickle in rank 1's partition stops both ranks
with exit 2 naming it, instead of one rank failing and the other hanging. Three launches, ~90 s."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from launch_env import child_env  # noqa: E402
from planted import flip_byte, plant, truncate  # noqa: E402
from test_engine_dist import launch, result  # noqa: E402
from train_variants import TINY_OVERRIDES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Each launch has its own timeout (a hang fails it); pytest's global 600 s per test would also
# count the fixture's launch against the first test, too tight on a busy shared machine.
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """z2 and z3 trained to step 4 on 2 ranks, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("ckpt_dist")
    template = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0     # really partition the tiny model
    (tmp / "zero3_test.json").write_text(json.dumps(template))
    common = TINY_OVERRIDES + ["train.per_device_train_batch_size=4", "deepspeed.enabled=true", "train.max_steps=4",
                               "train.save_steps=2", "train.save_total_limit=2", "train.lr_scheduler_type=constant"]
    spec = {"out": str(tmp / "out"), "variants": [
        {"name": "z2", "overrides": common + ["deepspeed.template=zero2"]},
        {"name": "z3", "overrides": common + [f"deepspeed.template={tmp / 'zero3_test.json'}"]}]}
    launch(spec, tmp, timeout=600)
    return tmp, spec


def test_two_ranks_fall_back_past_damage_and_resume_exactly(runs):
    from pipeline.checkpoint_files import verify

    tmp, spec = runs
    out = Path(spec["out"])
    first = {name: result(out, name)["losses"] for name in ("z2", "z3")}
    for name in ("z2", "z3"):
        files = json.loads((out / name / "checkpoints" / "step_4" / "manifest.json").read_text())["files"]
        assert {"rng_state_0.safetensors", "rng_state_1.safetensors", "train_state.json",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(files)
    damaged = out / "z2" / "checkpoints" / "step_4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    truncate(damaged)
    flipped = out / "z3" / "checkpoints" / "step_4" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    flip_byte(flipped)
    half = out / "z3" / "checkpoints" / ".tmp-step_6"           # a save killed half-way
    half.mkdir()
    (half / "rng_state_0.safetensors").write_bytes(b"partial")

    launch(spec, tmp, timeout=600)                               # the same command again
    log = "".join(p.read_text() for p in sorted(tmp.glob("spec_*.log")))
    assert f"warning: {damaged}: " in log and f"warning: {flipped}: CRC32 differs" in log
    assert f"warning: {half}: half-written checkpoint" in log
    for name in ("z2", "z3"):
        r = result(out, name)
        assert r["resumed"] and r["step"] == 4 and r["world_size"] == 2
        assert r["losses"] == pytest.approx(first[name], rel=1e-5), name     # steps 3-4 redone identically
        ckpts = out / name / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_2", "step_4"]
        assert verify(ckpts / "step_2") == [] and verify(ckpts / "step_4") == []


def test_planted_partition_of_rank_1_stops_both_ranks(runs):
    tmp, spec = runs
    run_dir, marker = Path(spec["out"]) / "z3", tmp / "marker"
    planted = run_dir / "checkpoints" / "step_4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant(planted, marker)                                       # manifest rewritten to match
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.train",
           "--config", str(run_dir / "config.yaml"), "train.max_steps=6"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("a rank hung on the refused checkpoint") from None
    assert proc.returncode != 0
    assert f"checkpoint error: {planted}: refused" in output, output[-3000:]
    assert output.count("checkpoint error:") == 2                # both ranks stopped, each with the error
    assert not marker.exists()
