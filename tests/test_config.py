"""The typed config: YAML + dotted overrides, and every bad-input case fails naming the field."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, dump_config, load_config

FIXTURE = str(Path(__file__).parent / "fixtures" / "gsm8k_aug_test.txt")


def write(tmp_path, tree) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_defaults_validate_and_overrides_apply():
    cfg = load_config(None, ["train.learning_rate=1e-4", "method.name=codi", "eval.seeds=[41,42,43]",
                             f"data.train.0.path={FIXTURE}"])
    assert isinstance(cfg, Config)
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.method.name == "codi"
    assert cfg.eval.seeds == [41, 42, 43]
    assert cfg.data.train[0].path == FIXTURE


def test_yaml_file_and_resolved_dump_round_trip(tmp_path):
    path = write(tmp_path, {"method": {"name": "coconut", "coconut": {"c_thought": 1}},
                            "data": {"train": [{"format": "gsm8k_aug", "path": FIXTURE}]}})
    cfg = load_config(path, ["train.seed=5"])
    assert (cfg.method.name, cfg.method.coconut.c_thought, cfg.train.seed) == ("coconut", 1, 5)
    text = dump_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg and "c_thought: 1" in text


@pytest.mark.parametrize("overrides, field, words", [
    (["train.lr=1"], "train.lr", "unknown key"),
    (["model.bogus.x=1"], "model.bogus", "unknown key"),
    (["train.learning_rate=abc"], "train.learning_rate", "expected float"),
    (["train.per_device_train_batch_size=two"], "train.per_device_train_batch_size", "expected int"),
    (["train.resume=3"], "train.resume", "expected bool"),
    (["method.name=magic"], "method.name", "choose one of: cot, nocot, coconut, codi, simcot"),
    (["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size", "must be > 0"),
    (["train.gradient_accumulation_steps=-2"], "train.gradient_accumulation_steps", "must be > 0"),
    (["method.num_latents=0"], "method.num_latents", "must be > 0"),
    (["train.max_steps=0"], "train.max_steps", "must be > 0"),
    (["deepspeed.train_batch_size=10", "deepspeed.world_size=2"], "deepspeed.train_batch_size", "must equal"),
    (["data.train.0.path=/nonexistent/file.txt"], "data.train.0.path", "does not exist"),
    (["model.name_or_path=./no/such/model"], "model.name_or_path", "does not exist"),
    (["deepspeed.enabled=true", "deepspeed.zero_stage=4"], "deepspeed.zero_stage", "0, 1, 2 or 3"),
    (["deepspeed.enabled=true", "deepspeed.template=nope"], "deepspeed.template", "zero3"),
    (["model.load_in_4bit=true", "deepspeed.enabled=true", "deepspeed.template=zero3"], "model.load_in_4bit",
     "ZeRO-3"),
    (["method.name=codi", "model.gradient_checkpointing=true"], "model.gradient_checkpointing", "KV cache"),
    (["method.name=simcot", "method.simcot.decoder=separate"], "method.simcot.decoder_model", "required"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio", "[0, 1)"),
    (["model.tiny.hidden_size=30", "model.tiny.num_heads=4"], "model.tiny.hidden_size", "divisible"),
])
def test_bad_input_names_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.train.0.path={FIXTURE}"] + overrides if "data.train.0.path" not in
                    overrides[0] else overrides)
    message = str(err.value)
    assert message.startswith(field), message
    assert words in message, message


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  train:\n    - format: gsm8k_aug\n      path: {FIXTURE}\n"
                    "train:\n  seed: 1\n  learning_rate: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith("train.learning_rate: expected float, got 'fast'")
    assert f"{path}, line 7" in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_every_shipped_recipe_config_validates():
    configs = sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("*.yaml"))
    for path in configs:
        text = path.read_text()
        # Recipes point at cluster data paths; validate the schema with the shipped fixture instead.
        tree = yaml.safe_load(text)
        for section in ("train", "eval"):
            for src in tree.get("data", {}).get(section, []) or []:
                if src.get("format") != "hf":
                    src["path"] = FIXTURE
        if tree.get("method", {}).get("coconut", {}).get("init_from"):
            tree["method"]["coconut"]["init_from"] = None
        tmp = Path(path.parent / f".check_{path.name}")
        try:
            tmp.write_text(yaml.safe_dump(tree))
            load_config(tmp)
        finally:
            tmp.unlink(missing_ok=True)


BAD_CLI_CASES = [
    ["train.lr=1"], ["train.learning_rate=abc"], ["method.name=magic"], ["train.per_device_train_batch_size=0"],
    ["deepspeed.train_batch_size=10", "deepspeed.world_size=2"], ["data.train.0.path=/nonexistent.txt"],
    ["deepspeed.enabled=true", "deepspeed.zero_stage=4"],
    ["model.load_in_4bit=true", "deepspeed.enabled=true", "deepspeed.template=zero3"],
]


def test_cli_rejects_bad_configs_before_loading_anything():
    """Through the real entry point: exit status 2, the field named on stderr, and neither
    transformers nor deepspeed imported (so no model or data was loaded)."""
    import json
    import subprocess
    import sys

    script = (
        "import contextlib, io, json, sys\n"
        "from pipeline.train import main\n"
        "out = []\n"
        f"for case in {BAD_CLI_CASES!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(case)\n"
        "    out.append([rc, err.getvalue()])\n"
        "print(json.dumps({'results': out, 'heavy': [m for m in ('transformers', 'deepspeed') if m in sys.modules]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    expected_fields = ["train.lr", "train.learning_rate", "method.name", "train.per_device_train_batch_size",
                       "deepspeed.train_batch_size", "data.train.0.path", "deepspeed.zero_stage",
                       "model.load_in_4bit"]
    for (rc, stderr), field in zip(report["results"], expected_fields):
        assert rc == 2 and f"config error: {field}:" in stderr, (field, rc, stderr)
