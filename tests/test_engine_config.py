"""Pure parts of the engine: the final ds_config, parameter groups, the LR schedule, checkpoint
pruning, the CLI's early config errors. No process group, no model weights (except the groups test)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import DS_CONFIG_DIR, Config, ConfigError, load_config
from pipeline.strategy import build_ds_config, lr_factor, param_group_name

TEMPLATES = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def ds_cfg(template: str, **train) -> Config:
    cfg = Config()
    cfg.deepspeed.enabled, cfg.deepspeed.template = True, template
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_resolves_every_auto(template):
    cfg = ds_cfg(template, per_device_train_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=1.5)
    cfg.model.dtype = "bf16"
    ds = build_ds_config(cfg, world_size=2)
    assert "auto" not in json.dumps(ds)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["gradient_clipping"] == 1.5 and ds["bf16"]["enabled"] is True
    zero = ds["zero_optimization"]
    if zero["stage"] == 3:   # export gathers the 16-bit weights from the partitions
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offload = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    assert ds.get("zero_force_ds_cpu_optimizer", True) is not offload   # our torch AdamW is allowed to offload


def test_templates_are_the_documented_set():
    assert {"zero0", "zero2", "zero3", "zero3_offload_optim", "zero3_offload_all"} <= set(TEMPLATES)
    stages = {t: json.loads((DS_CONFIG_DIR / f"{t}.json").read_text())["zero_optimization"] for t in TEMPLATES}
    assert "offload_param" in stages["zero3_offload_all"] and "offload_param" not in stages["zero3_offload_optim"]


def test_disabled_means_zero0_and_fp32():
    cfg = Config()
    cfg.deepspeed.template = "zero3"       # ignored while deepspeed.enabled is false
    ds = build_ds_config(cfg, world_size=1)
    assert ds["zero_optimization"]["stage"] == 0 and ds["bf16"]["enabled"] is False


def test_zero_stage_override():
    cfg = ds_cfg("zero2")
    cfg.deepspeed.zero_stage = 1
    assert build_ds_config(cfg, 4)["zero_optimization"]["stage"] == 1


def test_global_batch_mismatch_names_the_field():
    cfg = ds_cfg("zero2", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    cfg.deepspeed.train_batch_size = 16
    assert build_ds_config(cfg, world_size=2)["train_batch_size"] == 16
    with pytest.raises(ConfigError, match=r"deepspeed\.train_batch_size: 16 must equal .* = 32"):
        build_ds_config(cfg, world_size=4)


def test_concrete_template_value_must_agree(tmp_path):
    template = json.loads((DS_CONFIG_DIR / "zero2.json").read_text())
    template["train_micro_batch_size_per_gpu"] = 2
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(template))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 2 in the template but "
                                          "train.per_device_train_batch_size gives 8"):
        build_ds_config(ds_cfg(str(path)), 1)


def test_unresolvable_auto_and_optimizer_sections_are_rejected(tmp_path):
    template = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    template["zero_optimization"]["reduce_bucket_size"] = "auto"
    template["zero_optimization"]["sub_group_size"] = "auto"
    path = tmp_path / "auto.json"
    path.write_text(json.dumps(template))
    with pytest.raises(ConfigError, match=r"zero_optimization\.sub_group_size"):
        build_ds_config(ds_cfg(str(path)), 1, hidden_size=64)
    del template["zero_optimization"]["sub_group_size"]
    path.write_text(json.dumps(template))
    assert build_ds_config(ds_cfg(str(path)), 1, hidden_size=64)["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    template["optimizer"] = {"type": "AdamW"}
    path.write_text(json.dumps(template))
    with pytest.raises(ConfigError, match="'optimizer' section"):
        build_ds_config(ds_cfg(str(path)), 1)


def test_lr_schedule_warmup_then_decay():
    assert [lr_factor(s, warmup=2, total=10, kind="cosine") for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_factor(6, warmup=2, total=10, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(10, warmup=2, total=10, kind="cosine") == pytest.approx(0.0)
    assert lr_factor(6, warmup=2, total=10, kind="linear") == pytest.approx(0.5)
    assert lr_factor(9, warmup=2, total=10, kind="constant") == 1.0


def test_param_group_names():
    assert param_group_name("parts.lm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "main"
    assert param_group_name("parts.lm.base_model.model.model.layers.0.mlp.up_proj.lora_B.step_decoder.weight") == "decoder"
    assert param_group_name("parts.decoder.model.layers.0.mlp.up_proj.weight") == "decoder"
    assert param_group_name("parts.decoder_proj.weight") == "decoder"
    assert param_group_name("parts.projection.0.weight") == "projection"
    assert param_group_name("parts.lm.model.decoder.layers.0.fc1.weight") == "main"   # OPT-style names


def test_param_groups_learning_rates_and_frozen_parts(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    from train_variants import LORA, TINY_OVERRIDES

    from pipeline.strategy import param_groups
    from pipeline.train import build_module, load_run_tokenizer

    cfg = load_config(None, [*TINY_OVERRIDES, *LORA, "method.name=simcot", "method.simcot.decoder=shared",
                             "train.learning_rate=1e-3", "train.decoder_learning_rate=5e-4",
                             "train.projection_learning_rate=2e-3", "train.weight_decay=0.1"])
    module, _, _ = build_module(cfg, load_run_tokenizer(cfg, tmp_path))
    groups = {g["name"]: g for g in param_groups(module, cfg)}
    assert {n: g["lr"] for n, g in groups.items()} == {"main": 1e-3, "decoder": 5e-4, "projection": 2e-3,
                                                       "projection_no_decay": 2e-3}
    assert groups["projection_no_decay"]["weight_decay"] == 0.0 and groups["main"]["weight_decay"] == 0.1
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in in_groups for p in frozen)    # the frozen base is not optimised
    assert len(in_groups) == sum(p.requires_grad for p in module.parameters())


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    from pipeline.checkpoint import _prune, latest_tag
    from pipeline.checkpoint_files import write_manifest

    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "weights.bin").write_bytes(b"w" * step)
        write_manifest(tmp_path / f"step_{step}")      # only verified checkpoints count as complete
    (tmp_path / "latest").write_text("step_6")
    _prune(tmp_path, keep=2, current="step_6")
    # step_8 / step_10 are leftovers of a killed run beyond `latest`: kept until overwritten.
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_10", "step_4", "step_6", "step_8"]
    assert latest_tag(tmp_path) == "step_6"


def test_cli_config_error_exits_before_loading(capsys):
    from pipeline.train import main

    assert main(["train.learning_rate=-1"]) == 2
    assert "train.learning_rate: must be > 0" in capsys.readouterr().err


def test_short_coconut_curriculum_is_warned_about():
    from pipeline.config import load_config
    from pipeline.train import curriculum_warning

    base = ["method.name=coconut", "method.coconut.max_latent_stage=3", "method.coconut.epochs_per_stage=2"]
    assert "takes 8" in curriculum_warning(load_config(None, base + ["train.num_train_epochs=5"]))
    assert curriculum_warning(load_config(None, base + ["train.num_train_epochs=8"])) is None
    assert curriculum_warning(load_config(None, ["train.num_train_epochs=1"])) is None          # CoT
