"""ZeRO-3 parameter traffic (issue 12.3): the templates' keep_params_gathered key and hpZ "auto",
the planner's traffic table and recommendation, and on 2 CPU ranks: the benchmark's all-gather
counts (each weight of the latent rollout gathered exactly once per step), losses unchanged, and
the zero3_resident template equal to ZeRO-0 with rank-asymmetric batches still finishing.

Two torchrun launches (~1 min each on 2 cores); the rest is pure.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from pipeline.config import DS_CONFIG_DIR, Config, ConfigError, load_config
from pipeline.plan import format_plan, make_plan
from pipeline.strategy import build_ds_config, hpz_partition_size, keeps_params_gathered

ROOT = Path(__file__).resolve().parents[1]
RECIPE_8B = ROOT / "recipes" / "configs" / "llama8b_simcot.yaml"
GB = 1024 ** 3


def ds_cfg(template: str) -> Config:
    cfg = Config()
    cfg.deepspeed.enabled, cfg.deepspeed.template = True, template
    return cfg


# --------------------------------------------------------------------------- templates
def test_keep_params_gathered_is_read_and_removed(tmp_path):
    cfg = ds_cfg("zero3_resident")
    assert keeps_params_gathered(cfg)
    ds = build_ds_config(cfg, world_size=2)
    assert "keep_params_gathered" not in ds and ds["zero_optimization"]["stage"] == 3
    # Only ZeRO-3 partitions parameters: at another stage, or with DeepSpeed off, nothing is held.
    assert not keeps_params_gathered(ds_cfg("zero3")) and not keeps_params_gathered(Config())
    cfg.deepspeed.zero_stage = 2
    assert not keeps_params_gathered(cfg) and "keep_params_gathered" not in build_ds_config(cfg, 2)

    template = json.loads((DS_CONFIG_DIR / "zero3_resident.json").read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**template, "keep_params_gathered": "always"}))
    with pytest.raises(ConfigError, match=r"keep_params_gathered is 'always'; choose one of never, "
                                          r"repeatedly_called_parts"):
        build_ds_config(ds_cfg(str(bad)), 2)
    template["zero_optimization"]["offload_param"] = {"device": "cpu"}
    bad.write_text(json.dumps(template))
    with pytest.raises(ConfigError, match="contradicts offload_param"):
        keeps_params_gathered(ds_cfg(str(bad)))


def test_hpz_partition_is_one_node(monkeypatch):
    assert hpz_partition_size(16, 8) == 8
    assert hpz_partition_size(8, 8) == 1          # one node: a secondary partition would only cost memory
    assert hpz_partition_size(12, 8) == 1         # nodes of unequal size: off
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")   # what torchrun / the deepspeed launcher set
    zero = build_ds_config(ds_cfg("zero3_resident_hpz"), world_size=8)["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == 4
    assert build_ds_config(ds_cfg("zero3_resident_hpz"), world_size=4)["zero_optimization"][
        "zero_hpz_partition_size"] == 1


# --------------------------------------------------------------------------- the planner
def _options(plan) -> dict:
    return {o.template: o for o in plan.traffic}


def test_plan_traffic_llama8b_simcot_one_node(capsys):
    cfg = load_config(RECIPE_8B, ["deepspeed.world_size=8"])
    plan = make_plan(cfg, str(RECIPE_8B), gpu_memory_gb=80)
    p = plan.params
    lm, dec, proj = p["base"][0] + p["lora"][0], p["decoder"][0], p["projection"][0]
    accum, width, latents = 2, 2, 6
    opts = _options(plan)
    assert list(opts) == ["zero2", "zero3", "zero3_resident"]            # one node: no hpZ row
    # ZeRO-2: the trainable weights, gathered once after each optimizer step.
    assert opts["zero2"].gathered == p["total"][1] * width
    # ZeRO-3: every call (teacher, question, 6 latents, answer; the decoder; the projection per latent)
    # and once more in backward, every micro step.
    calls = {"lm": latents + 3, "decoder": 1, "projection": latents}
    assert opts["zero3"].gathered == accum * width * ((calls["lm"] + 1) * lm + 2 * dec + (latents + 1) * proj)
    # keep rollout: the repeatedly called lm and projection once per optimizer step; the decoder as ZeRO-3.
    assert opts["zero3_resident"].gathered == width * (lm + proj) + accum * width * 2 * dec
    assert opts["zero3"].gathered / opts["zero3_resident"].gathered > 4
    assert all(o.inter_node == 0 for o in plan.traffic)
    # Memory: keep rollout holds the lm whole on top of ZeRO-3's states.
    assert opts["zero3_resident"].memory == pytest.approx(opts["zero3"].memory + width * (lm + proj))
    assert not opts["zero2"].fits and opts["zero3_resident"].fits          # ZeRO-2 is over 90% of 80 GB
    assert plan.recommendation.startswith("ZeRO-3 keep rollout (template zero3_resident)")
    assert cfg.deepspeed.template == "zero3_resident"                      # and the recipe uses it

    text = format_plan(plan)
    assert "parameter traffic per GPU per optimizer step, GB all-gathered" in text
    row = rf"^  ZeRO-3 keep rollout\s+zero3_resident\s+{opts['zero3_resident'].gathered / GB:.1f}\s+0\.0\s+" \
          rf"{opts['zero3_resident'].memory / GB:.1f}  yes$"
    assert re.search(row, text, re.M), text
    assert re.search(r"^recommend   ZeRO-3 keep rollout \(template zero3_resident\)", text, re.M)


def test_plan_traffic_two_nodes_and_small_gpus():
    cfg = load_config(RECIPE_8B, ["deepspeed.world_size=16", "train.gradient_accumulation_steps=1"])
    plan = make_plan(cfg, gpu_memory_gb=80)
    opts = _options(plan)
    trainable = plan.params["total"][1] * 2
    assert list(opts) == ["zero2", "zero3", "zero3_resident", "zero3_resident_hpz"]
    # Half of a 16-GPU gather comes from the other node; with hpZ only each trainable weight's first
    # gather after an optimizer step does.
    assert opts["zero3_resident"].inter_node == opts["zero3_resident"].gathered / 2
    assert opts["zero3_resident_hpz"].inter_node == trainable / 2
    assert opts["zero3_resident_hpz"].gathered == opts["zero3_resident"].gathered
    assert opts["zero3_resident_hpz"].memory > opts["zero3_resident"].memory
    # On 16 GPUs ZeRO-2's replicated weights fit, and nothing gathers less.
    assert plan.recommendation.startswith("ZeRO-2 (template zero2)")
    assert make_plan(cfg, gpu_memory_gb=24).recommendation.startswith("none of these fits in 90% of 24 GB")


@pytest.mark.parametrize("recipe, template", [("llama3b_codi", "zero2"), ("llama8b_softcot", "zero2"),
                                              ("gpt2_coconut", "zero2")])
def test_plan_recommends_zero2_where_the_frozen_weights_fit(recipe, template):
    plan = make_plan(load_config(ROOT / "recipes" / "configs" / f"{recipe}.yaml"))
    assert plan.recommendation.startswith(f"ZeRO-2 (template {template})")
    assert _options(plan)["zero2"].gathered <= _options(plan)["zero3_resident"].gathered


# --------------------------------------------------------------------------- 2 ranks
@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_zero3_traffic
    return bench_zero3_traffic


def test_benchmark_counts_each_rollout_weight_once_per_step(bench):
    """The benchmark at a tiny size: real steps on 2 ranks, every all-gather counted. One counted
    step after one warm-up step (the first micro step holds nothing: it counts the calls)."""
    summary = bench.measure(hidden=32, layers=2, batch=2, latents=2, steps=1, warmup=1,
                            methods=("cot", "codi", "simcot_full"), timeout=600)
    r = summary["results"]
    for method in ("cot", "codi", "simcot_full"):   # same training whatever the setting
        losses = [r[s][method]["loss"] for s in ("zero3", "zero3_resident", "zero2")]
        assert losses == pytest.approx([losses[0]] * 3, rel=1e-5), method
    codi = r["zero3_resident"]["codi"]
    parts = codi["part_gather_bytes"]
    # The lm (5 calls) and the projection (2 calls) are gathered exactly once, nothing in backward.
    assert codi["bytes_per_step"] == parts["lm"] + parts["projection"]
    assert codi["backward_bytes"] == 0
    assert r["zero3"]["codi"]["bytes_per_step"] > 3 * codi["bytes_per_step"]
    # CoT-SFT calls its model once: nothing to hold, the same traffic as zero3.
    assert r["zero3_resident"]["cot"]["bytes_per_step"] == r["zero3"]["cot"]["bytes_per_step"]
    # The full decoder (called once) is gathered for its forward and its backward, the lm once.
    simcot = r["zero3_resident"]["simcot_full"]
    assert simcot["forward_bytes"] >= parts["lm"] + parts["projection"] + simcot["part_gather_bytes"]["decoder"]
    assert simcot["ratio_vs_cot_same_setting"] <= 2.0 and summary["target"]["met"]
    assert r["zero3"]["simcot_full"]["bytes_per_step"] > 2 * simcot["bytes_per_step"]
    # ZeRO-2 gathers only the trained weights (LoRA + trainable rows + projection), after the step.
    assert r["zero2"]["codi"]["forward_bytes"] == r["zero2"]["codi"]["backward_bytes"] == 0
    assert 0 < r["zero2"]["codi"]["optimizer_step_bytes"] < parts["lm"] / 4
    assert "| zero3_resident | simcot_full |" in bench.format_table(summary)


def test_resident_template_equals_zero0_and_asymmetric_ranks_finish(tmp_path):
    """codi, SIM-CoT (full decoder) and SIM-CoT on Coconut (shared decoder, curriculum: the held
    set changes with the stage) under zero3_resident equal ZeRO-0 over 3 steps (losses and
    gradient norms), CODI with hpZ too; rank 0 without SIM-CoT targets / with fewer latents still
    finishes."""
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from test_engine_dist import launch, result
    from train_variants import COCONUT, LORA, TINY_OVERRIDES, asymmetric_variants

    template = json.loads((DS_CONFIG_DIR / "zero3_resident.json").read_text())
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0   # partition everything
    resident = tmp_path / "zero3_resident_test.json"
    resident.write_text(json.dumps(template))
    methods = {"codi": ["method.name=codi", *LORA],
               "simcot_full": ["method.name=simcot", "method.simcot.decoder=full"],
               "simcot_shared_coconut": ["method.name=simcot", "method.simcot.decoder=shared",
                                         "method.simcot.base=coconut", *COCONUT, *LORA]}
    variants = []
    for template_name, path in (("zero0", "zero0"), ("resident", str(resident))):
        common = TINY_OVERRIDES + ["train.per_device_train_batch_size=4", "deepspeed.enabled=true",
                                   f"deepspeed.template={path}"]
        variants += [{"name": f"{template_name}_{m}", "overrides": common + extra} for m, extra in methods.items()]
    # hpZ as well: on one machine "auto" turns it off, so force a secondary partition over both ranks
    # (DeepSpeed creates its group once per process: one variant). The frozen base keeps its secondary.
    template["zero_optimization"]["zero_hpz_partition_size"] = 2
    hpz = tmp_path / "zero3_resident_hpz_test.json"
    hpz.write_text(json.dumps(template))
    common = TINY_OVERRIDES + ["train.per_device_train_batch_size=4", "deepspeed.enabled=true"]
    variants.append({"name": "hpz_codi", "overrides": common + [f"deepspeed.template={hpz}", *methods["codi"]]})
    common = common + [f"deepspeed.template={resident}"]
    variants += asymmetric_variants(common, prefix="asym_")
    out = tmp_path / "out"
    launch({"out": str(out), "variants": variants}, tmp_path, timeout=420)

    def grad_norms(name):
        log = (out / name / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["grad_norm"] for line in log]

    for m in methods:
        ref, got = result(out, f"zero0_{m}"), result(out, f"resident_{m}")
        assert got["zero_stage"] == 3 and got["step"] == ref["step"] == 3
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), m
        assert grad_norms(f"resident_{m}") == pytest.approx(grad_norms(f"zero0_{m}"), rel=1e-4), m
    assert result(out, "hpz_codi")["losses"] == pytest.approx(result(out, "zero0_codi")["losses"], rel=1e-5)
    assert result(out, "resident_simcot_shared_coconut")["stage"] == 2
    assert result(out, "asym_no_steps")["step"] == 3
    assert result(out, "asym_fewer_latents")["step"] == 3 and result(out, "asym_fewer_latents")["stage"] == 2


def test_bench_scaling_keeps_the_template_fraction(bench):
    """The 8B-like thresholds: each ZeRO-3 window scaled by the model-size ratio (at least 1)."""
    scale = 3_000_000 / bench.LLAMA_8B_PARAMS
    zero = bench.scaled_template("zero3", scale)["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == round(1e9 * scale)        # DeepSpeed's default, scaled
    assert zero["stage3_prefetch_bucket_size"] == round(5e7 * scale)
    assert zero["stage3_param_persistence_threshold"] == max(1, round(1e5 * scale))
    assert bench.scaled_template("zero2", scale)["zero_optimization"].get("stage3_max_reuse_distance") is None
    assert bench.lora_rank(256) == 8 and bench.lora_rank(4096) == 128
