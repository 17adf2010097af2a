"""`--plan` prints parameter counts and per-GPU memory from a meta-device model (no weights, no GPU),
in the format documented in pipeline/plan.py, and every shipped recipe validates and plans."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.plan import format_plan, make_plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


def test_llama8b_simcot_full_decoder_on_8x80gb(capsys):
    from pipeline.train import main

    assert main(["--plan", "--config", str(ROOT / "recipes/configs/llama8b_simcot.yaml"),
                 "deepspeed.world_size=8", "--gpu-memory-gb", "80"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == f"memory plan: {ROOT / 'recipes/configs/llama8b_simcot.yaml'}"
    assert lines[1].startswith("model       meta-llama/Llama-3.1-8B-Instruct (llama, hidden 4096, 32 layers, "
                               "vocab 128261 incl. 5 latent tokens), dtype bf16")
    assert lines[2] == "method      simcot (base codi, decoder full), 6 latents"
    assert lines[3].startswith("cluster     8 GPUs = 1 node x 8, 80 GB each; micro batch 8 x accumulation 2 = "
                               "global batch 128")
    rows = {m.group(1): (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
            for m in re.finditer(r"^  (base|lora|decoder|projection|total)\s+([\d,]+)\s+([\d,]+)$", text, re.M)}
    # LLaMA-3.1-8B is 8,030,261,248 parameters; + 5 latent rows in the untied embedding and LM head.
    assert rows["base"] == (8_030_261_248 + 2 * 5 * 4096, 0)                  # frozen under LoRA
    assert rows["lora"][1] == 32 * 128 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)) + 5 * 4096
    assert rows["decoder"] == (rows["base"][0], rows["base"][0])              # the full decoder trains all of it
    assert rows["projection"][0] == 2 * 4096 * 4096 + 4096 + 4096 + 2 * 4096
    assert rows["total"][1] == rows["lora"][1] + rows["decoder"][1] + rows["projection"][1]
    z2 = re.search(r"^  ZeRO-2\s+([\d.]+)\s+([\d.]+)\s+-$", text, re.M)
    z3 = re.search(r"^  ZeRO-3\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    assert z2 and z3
    z3_gb = [float(x) for x in z3.groups()]
    assert z3_gb[0] > z3_gb[1] > z3_gb[2] > 0 and float(z2.group(1)) > z3_gb[0]   # offload / partitioning help
    assert re.search(r"^activations per GPU, GB   \(micro batch 8, .*seq 200 = data.max_tokens\)$", text, re.M)
    assert re.search(r"^  step decoder\s+[\d.]+$", text, re.M)
    assert re.search(r"^verdict     ZeRO-3 \(template zero3_resident\): model states [\d.]+ \+ activations [\d.]+ \+ held rollout weights [\d.]+ = "
                     r"[\d.]+ GB of 80 GB: (fits|DOES NOT FIT)$", text, re.M)


def test_plan_reacts_to_cluster_size():
    cfg8 = load_config(ROOT / "recipes/configs/llama8b_simcot.yaml", ["deepspeed.world_size=8"])
    cfg16 = load_config(ROOT / "recipes/configs/llama8b_simcot.yaml",
                        ["deepspeed.world_size=16", "train.gradient_accumulation_steps=1"])
    p8, p16 = make_plan(cfg8), make_plan(cfg16)
    assert p16.states["zero3"]["gpu"] < p8.states["zero3"]["gpu"]
    assert "16 GPUs = 2 nodes x 8" in p16.cluster_line
    assert not make_plan(cfg8, gpu_memory_gb=24).fits


# Recipes whose data `latent-make-task` generates rather than the repository shipping (their header
# says so): the test runs them from a directory holding that data, as a user would.
GENERATED_DATA = {"chain_simcot_cpu": "small_chain_root"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_plans(recipe, request, monkeypatch):
    if recipe.stem in GENERATED_DATA:
        monkeypatch.chdir(request.getfixturevalue(GENERATED_DATA[recipe.stem]))
    cfg = load_config(recipe)
    if cfg.deepspeed.enabled:    # cluster recipes come with a thin launcher that passes "$@" through
        launcher = ROOT / "recipes" / f"{recipe.stem}.sh"
        assert launcher.is_file() and '"$@"' in launcher.read_text()
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("#")
    text = format_plan(make_plan(cfg, str(recipe)))
    assert "verdict" in text and re.search(r"^recommend   \S", text, re.M)
