"""The one typed configuration schema, its YAML loader, dotted overrides and validation.

Everything is checked here, before any model or data loads, so a bad run fails in well under a
second with a message that names the field (and the YAML file and line where it came from):

    cfg = load_config("recipes/configs/smollm2_codi_cpu.yaml", ["train.learning_rate=1e-4"])

`schema.py` holds the dataclasses (defaults live there, nowhere else), `loading.py` the YAML and
override handling, `validation.py` the semantic checks.
"""
from pipeline.config.loading import config_to_dict, dump_config, load_config
from pipeline.config.schema import (
    DEFAULT_TRAIN_FILE, DS_CONFIG_DIR, METHODS, REPO_ROOT, SMOLLM2_ALIAS, SMOLLM2_GGUF, CoconutConfig, CodiConfig,
    Config, ConfigError, DataConfig, DataSource, DeepSpeedConfig, EvalConfig, LoraConfig, MethodConfig, ModelConfig,
    SimCotConfig, SoftCoTConfig, TinyModelConfig, TrainConfig, smollm2_gguf_dir,
)
from pipeline.config.validation import LATENT_METHODS, on_codi, resolve_ds_template, validate

__all__ = [
    "DEFAULT_TRAIN_FILE", "DS_CONFIG_DIR", "LATENT_METHODS", "METHODS", "REPO_ROOT", "SMOLLM2_ALIAS", "SMOLLM2_GGUF",
    "CoconutConfig", "CodiConfig", "Config", "ConfigError", "DataConfig", "DataSource", "DeepSpeedConfig",
    "EvalConfig", "LoraConfig", "MethodConfig", "ModelConfig", "SimCotConfig", "SoftCoTConfig", "TinyModelConfig",
    "TrainConfig", "config_to_dict", "dump_config", "load_config", "on_codi", "resolve_ds_template", "smollm2_gguf_dir",
    "validate",
]
