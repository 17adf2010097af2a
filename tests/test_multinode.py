"""Multi-node on one machine: 2 "nodes" x 1 rank through recipes/slurm/train.sbatch.

A stand-in srun (tests/dist/fake_srun.sh) starts the script's command once per node, as `srun
--ntasks-per-node=1` does: two torchrun agents (`--nnodes 2`, c10d rendezvous on the "first node"),
each starting one rank, so global rank 1 is local rank 0 of node 1. On one shared output
directory (a cluster's shared filesystem) the test runs train → checkpoint, then the same command
again → resume → export, and an uninterrupted reference, and checks who wrote what: one config,
log, latest pointer and export (global rank 0), one RNG file and one ZeRO-3 partition per global
rank, and the resumed losses equal to the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_env import child_env

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TIMEOUT = 900      # per launch: ~30 s on an idle 2-core machine, many minutes on a crowded one
pytestmark = pytest.mark.timeout(3 * TIMEOUT + 120)     # the module fixture makes 3 launches
# Tiny LLaMA with the card's recipe (SIM-CoT, full decoder, LoRA, ZeRO-3); a constant learning rate,
# so a run stopped at step 2 and resumed to 4 follows the same schedule as one run of 4 steps.
TINY = ["model.name_or_path=tiny-llama", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
        "model.tiny.num_heads=4", "model.tiny.vocab_size=500", "model.lora.r=4", "model.dtype=fp32",
        "data.train.0.format=gsm8k_aug", f"data.train.0.path={FIXTURES / 'gsm8k_aug_train.txt'}",
        "data.train.0.max_examples=8", "data.max_tokens=1000",
        "data.eval.0.format=gsm8k_aug", f"data.eval.0.path={FIXTURES / 'gsm8k_aug_valid.txt'}",
        "data.eval.0.max_examples=4", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
        "train.lr_scheduler_type=constant", "train.warmup_ratio=0", "train.learning_rate=3e-3",
        "train.logging_steps=1", "train.save_steps=1", "train.save_total_limit=2", "train.report_to=[]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch(tmp: Path, name: str, *overrides: str) -> list[str]:
    """`bash recipes/slurm/train.sbatch llama8b_simcot …` inside a faked 2-node allocation; returns
    each node's output."""
    logs = tmp / f"{name}_node"
    env = child_env(PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                    SRUN=str(ROOT / "tests" / "dist" / "fake_srun.sh"), FAKE_SRUN_LOG=str(logs),
                    SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID=f"test-{name}", SLURM_SUBMIT_DIR=str(ROOT),
                    GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    env.pop("SLURM_JOB_NODELIST", None)
    proc = subprocess.Popen(["bash", str(ROOT / "recipes" / "slurm" / "train.sbatch"), "llama8b_simcot", *TINY,
                             *overrides], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = f"timed out after {TIMEOUT} s"
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:    # also when pytest's own timeout interrupts: no "node" may outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    nodes = [Path(f"{logs}{n}.log").read_text() if Path(f"{logs}{n}.log").is_file() else "" for n in (0, 1)]
    assert proc.returncode == 0, out + "".join(f"\n--- node {n}\n{text[-3000:]}" for n, text in enumerate(nodes))
    return nodes


def losses(run: Path) -> dict[int, float]:
    records = map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}      # not the validation records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    first = sbatch(tmp, "first", f"train.output_dir={tmp / 'run'}", "train.max_steps=2", "train.export=false")
    second = sbatch(tmp, "second", f"train.output_dir={tmp / 'run'}", "train.max_steps=4")
    reference = sbatch(tmp, "reference", f"train.output_dir={tmp / 'reference'}", "train.max_steps=4",
                       "train.export=false")
    return tmp, first, second, reference


def test_two_nodes_resume_like_one_uninterrupted_run(runs):
    tmp, first, second, _ = runs
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == 3
    assert metrics["resumed"] and metrics["step"] == 4
    assert "resumed at step 2" in second[0] + second[1]
    got, want = losses(tmp / "run"), losses(tmp / "reference")
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in range(1, 5)] == pytest.approx([want[s] for s in range(1, 5)], rel=1e-5)


def test_each_file_is_written_once_by_the_right_rank(runs):
    tmp, first, second, _ = runs
    ckpt = tmp / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_4"
    best = json.loads((tmp / "run" / "metrics.json").read_text())["best_checkpoint"]   # by validation
    # save_total_limit=2, plus the best checkpoint, which pruning never deletes
    assert sorted(p.name for p in ckpt.glob("step_*")) == sorted({"step_3", "step_4", best})
    step = ckpt / "step_4"
    assert sorted(p.name for p in step.glob("rng_state_*")) == ["rng_state_0.safetensors", "rng_state_1.safetensors"]
    partitions = sorted(p.name for p in step.glob("*optim_states.pt"))
    assert len(partitions) == 2 and any("rank_0" in p for p in partitions) and any("rank_1" in p for p in partitions)
    # Global rank 0 speaks and exports; the other node's rank (local rank 0 there) does neither.
    # (The c10d rendezvous numbers the nodes in arrival order: either log may be global rank 0's.)
    for text in first + second:
        assert "Traceback" not in text
    assert sum("exported to" in text for text in second) == 1
    assert sum("world size 2" in text for text in first) == 1
    assert (tmp / "run" / "config.yaml").is_file() and not (tmp / "run" / "export" / "step_decoder").exists()


def test_the_export_of_two_nodes_reloads_and_equals_the_offline_one(runs):
    from transformers import AutoModelForCausalLM

    from pipeline.export import export_from_checkpoint, load_exported

    tmp = runs[0]
    live = load_exported(tmp / "run" / "export")
    assert live.meta["method"] == "simcot" and live.projection is not None
    # The run exports its best checkpoint by validation (load_best_model_at_end in the recipe).
    best = json.loads((tmp / "run" / "metrics.json").read_text())["best_checkpoint"]
    offline = export_from_checkpoint(tmp / "run" / "checkpoints" / best, tmp / "offline")
    probe = torch.tensor([[5, 17, 42, 99, 500, 3, 250, 11]])
    plain = AutoModelForCausalLM.from_pretrained(str(tmp / "run" / "export")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=probe).logits,
                                   load_exported(offline).model(input_ids=probe).logits, atol=1e-5, rtol=1e-5)


def _load_with_a_stale_view(rank: int, root: str, port: int) -> None:
    """One of two gloo ranks; rank 1's view of the shared directory is older than rank 0's."""
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from pipeline import checkpoint

    dist.init_process_group("gloo", rank=rank, world_size=2)
    checkpoint.files.verify = lambda *_args, **_kw: []       # both checkpoints count as intact
    if rank == 1:     # e.g. NFS attribute caching: step_2 and `latest` naming it are not visible here yet
        checkpoint._committed = lambda _root: ["step_1"]
        checkpoint.latest_tag = lambda _root: "step_1"

    class Recorder:   # stands in for the engine: records which checkpoint this rank loads
        def load_checkpoint(self, _root, tag):
            Path(root, f"loaded_by_rank{rank}").write_text(tag)

    tag = checkpoint.resume_tag(Path(root).parent)
    state = checkpoint.load(Recorder(), Path(root).parent, tag)
    assert state.step == 2
    dist.destroy_process_group()


@pytest.mark.timeout(900)     # two spawned processes import torch + DeepSpeed: minutes on a crowded machine
def test_every_rank_resumes_the_checkpoint_global_rank_0_names(tmp_path):
    """Ranks on different nodes may list different checkpoints; they must load one tag, rank 0's."""
    import torch.multiprocessing as mp

    from pipeline.checkpoint_files import TRAIN_STATE

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / TRAIN_STATE).write_text(json.dumps({"step": step}))
    (root / "latest").write_text("step_2")
    mp.start_processes(_load_with_a_stale_view, args=(str(root), free_port()), nprocs=2, start_method="spawn")
    assert [(root / f"loaded_by_rank{r}").read_text() for r in (0, 1)] == ["step_2", "step_2"]
