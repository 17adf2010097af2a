"""Every training recipe trains for real through its own launcher, on CPU, with a tiny model.

The card's command runs as a user types it, on 2 ranks with the recipe's own ZeRO stage:

    deepspeed --num_gpus 2 recipes/llama8b_simcot.sh model.name_or_path=tiny-llama data.train.0.format=gsm8k_aug …

The other recipes run on 1 rank each (a 2-rank launch costs ~15-20 s more per recipe; 2 ranks are
exercised by the card's command, tests/test_engine_dist.py and tests/test_multinode.py), two at a
time, alternating the two entry forms that reach the deepspeed launcher: `deepspeed --num_gpus 1
recipes/X.sh …` (the launcher runs the file as Python on each rank) and `bash recipes/X.sh
--num_gpus 1 …` (bash hands over to recipes/launch.sh). Overrides swap in the tiny model and the
shipped GSM8k-Aug slices and shorten the run; method, LoRA, dtype and ZeRO stage stay the recipe's.
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
import yaml
from launch_env import child_env

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FIXTURES = ROOT / "tests" / "fixtures"
TRAINING = sorted(p.stem for p in (RECIPES / "configs").glob("*.yaml")
                  if (RECIPES / f"{p.stem}.sh").is_file() and "softcot" not in p.stem)
TIMEOUT = 900      # per launch; ~15 s on an idle 2-core machine, many minutes on a crowded one
pytestmark = pytest.mark.timeout(TIMEOUT + 120)


def smoke_overrides(recipe: str, out: Path) -> list[str]:
    """A tiny model of the recipe's family and 3 examples (one step per epoch: Coconut's second step
    is its stage 1, with latents); the recipe's method, dtype, LoRA and ZeRO stage are kept."""
    arch = "tiny-gpt2" if recipe.startswith("gpt2") else "tiny-llama"
    return [f"model.name_or_path={arch}", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
            "model.tiny.num_heads=4", "model.tiny.vocab_size=500", "model.tiny.max_position_embeddings=1024",
            "model.lora.r=4", "method.simcot.decoder_lora_r=4",
            "method.coconut.epochs_per_stage=1",
            "data.train.0.format=gsm8k_aug", f"data.train.0.path={FIXTURES / 'gsm8k_aug_train.txt'}",
            "data.train.0.max_examples=3", "data.max_tokens=1000",   # keeps all 3 (the filter still runs)
            "data.eval.0.format=gsm8k_aug", f"data.eval.0.path={FIXTURES / 'gsm8k_aug_valid.txt'}",
            "data.eval.0.max_examples=4",
            "train.max_steps=2", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
            "train.logging_steps=1", "train.report_to=[]", f"train.output_dir={out}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    # DS_ACCELERATOR=cpu (child_env) for the launcher too: it counts devices before starting ranks.
    return child_env(PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")


def start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: Path) -> None:
    rc = None
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:    # also when pytest's own timeout interrupts: no rank may outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, f"exit {rc} (None: timed out after {TIMEOUT} s):\n" + log.read_text()[-4000:]


def finish_all(procs: list[tuple[str, Path, Path, subprocess.Popen]]) -> None:
    try:
        for _, _, log, proc in procs:
            finish(proc, log)
    finally:
        for _, _, _, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def recipe_stage(recipe: str) -> int:
    template = yaml.safe_load((RECIPES / "configs" / f"{recipe}.yaml").read_text())["deepspeed"]["template"]
    return json.loads((ROOT / "ds_configs" / f"{template}.json").read_text())["zero_optimization"]["stage"]


def check_run(recipe: str, out: Path, world: int) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["step"], metrics["world_size"]) == (2, world), metrics
    assert metrics["zero_stage"] == recipe_stage(recipe)
    wanted = yaml.safe_load((RECIPES / "configs" / f"{recipe}.yaml").read_text())
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["method"]["name"] == wanted["method"]["name"]
    assert resolved["model"]["dtype"] == wanted["model"]["dtype"]
    meta = json.loads((out / "export" / "latent_meta.json").read_text())
    assert meta["method"] == wanted["method"]["name"]
    if "coconut" in recipe:                  # the second step trained Coconut's stage 1 (latents)
        assert metrics["stage"] == 1


def test_card_command_on_two_ranks(tmp_path):
    """`deepspeed --num_gpus 2 recipes/llama8b_simcot.sh …` from an unrelated directory, ZeRO-3; the
    output directory's name holds spaces and shell metacharacters, and must be used literally."""
    out = tmp_path / "run dir; $(touch PWNED) & 'q' \"dq\""
    log = tmp_path / "card.log"
    finish(start(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(RECIPES / "llama8b_simcot.sh"),
                  *smoke_overrides("llama8b_simcot", out)], tmp_path, log), log)
    check_run("llama8b_simcot", out, world=2)
    assert recipe_stage("llama8b_simcot") == 3
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()


@pytest.mark.parametrize("pair", [TRAINING[i:i + 2] for i in range(0, len(TRAINING), 2)], ids="+".join)
def test_every_training_recipe_through_its_launcher(pair, tmp_path):
    procs = []
    for k, recipe in enumerate(r for r in pair if r != "llama8b_simcot"):   # the card's test runs that one
        out, log = tmp_path / recipe, tmp_path / f"{recipe}.log"
        # Two launchers run at once: each needs its own rendezvous port (both default to 29500).
        port = ["--master_port", str(free_port())]
        launcher = (["deepspeed", "--num_gpus", "1", *port, str(RECIPES / f"{recipe}.sh")] if k == 0 else
                    ["bash", str(RECIPES / f"{recipe}.sh"), "--num_gpus", "1", *port])
        procs.append((recipe, out, log, start([*launcher, *smoke_overrides(recipe, out)], tmp_path, log)))
    finish_all(procs)
    for recipe, out, _, _ in procs:
        check_run(recipe, out, world=1)
