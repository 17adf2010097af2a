"""Semantic checks that types alone cannot express; every error names the field."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.config.schema import DS_CONFIG_DIR, Config, ConfigError

# --------------------------------------------------------------------------- validation

LATENT_METHODS = ("coconut", "codi", "simcot")


def on_codi(cfg: Config) -> bool:
    """CODI, or SIM-CoT on CODI: the runs that read method.codi."""
    return cfg.method.name == "codi" or (cfg.method.name == "simcot" and cfg.method.simcot.base == "codi")


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
        "method.simcot.latents_per_step": cfg.method.simcot.latents_per_step,
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
        "train.eval_steps": cfg.train.eval_steps,
        "method.coconut.steps_per_stage": cfg.method.coconut.steps_per_stage,
        "data.max_tokens": cfg.data.max_tokens,
        "deepspeed.world_size": cfg.deepspeed.world_size,
        "deepspeed.train_batch_size": cfg.deepspeed.train_batch_size,
        "train.decoder_learning_rate": cfg.train.decoder_learning_rate,
        "train.projection_learning_rate": cfg.train.projection_learning_rate,
        "method.codi.projection_inner_size": cfg.method.codi.projection_inner_size,
        "method.codi.gradual_steps_per_stage": cfg.method.codi.gradual_steps_per_stage,
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
            if src.format != "hf" and Path(src.path).is_dir():
                from pipeline.data.sources import DataError, resolve_file   # pure Python
                try:
                    resolve_file(src.format, src.path, src.split, f"{section}.{i}.path")
                except DataError as exc:
                    raise ConfigError(f"{exc}{where(f'{section}.{i}.path')}") from None
            elif src.format != "hf" and not Path(src.path).is_file():
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
    codi = on_codi(cfg)
    if codi and cfg.data.drop_last_step and not cfg.method.codi.include_last_step:
        # Both remove the final step: the teacher would silently train without the last two.
        fail("data.drop_last_step", "true together with method.codi.include_last_step=false drops the last "
             "two steps from CODI's teacher; CODI already drops the last step, so set data.drop_last_step=false "
             "(or method.codi.include_last_step=true to drop exactly one)")
    if codi and cfg.method.codi.gradual_steps_per_stage and cfg.method.name == "simcot" \
            and cfg.method.simcot.latents_per_step != 1:
        # Stage k has k latents for the first k steps: one latent per step.
        fail("method.codi.gradual_steps_per_stage", "needs method.simcot.latents_per_step=1 (stage k replaces "
             f"k steps by k latents), got {cfg.method.simcot.latents_per_step}")
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

    _validate_softcot(cfg, fail)

    if cfg.train.eval_steps and not cfg.data.eval:
        fail("train.eval_steps", "validation during training needs data.eval (e.g. a GSM8k-Aug valid.txt); "
             "select models on a validation split, never on test")
    if cfg.train.load_best_model_at_end and not cfg.train.eval_steps:
        fail("train.load_best_model_at_end", "needs train.eval_steps (the best checkpoint is chosen by validation)")

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


def _validate_softcot(cfg: Config, fail) -> None:
    """SoftCoT / SoftCoT++ fields (checked whatever the method, so a typo fails early too)."""
    sc = cfg.method.softcot
    if sc.num_thought_sets < 1:
        fail("method.softcot.num_thought_sets", f"must be >= 1 (1 = plain SoftCoT), got {sc.num_thought_sets}")
    if sc.contrastive_temperature <= 0:
        fail("method.softcot.contrastive_temperature", f"must be > 0, got {sc.contrastive_temperature}")
    if sc.contrastive_weight is not None and sc.contrastive_weight < 0:
        fail("method.softcot.contrastive_weight", f"must be >= 0 when set, got {sc.contrastive_weight}")
    if not 0 <= sc.contrastive_dropout < 1:
        fail("method.softcot.contrastive_dropout", f"must be in [0, 1), got {sc.contrastive_dropout}")
    if sc.initial_tokens is not None and len(sc.initial_tokens) != sc.num_thought_sets:
        fail("method.softcot.initial_tokens", f"names {len(sc.initial_tokens)} tokens for "
             f"method.softcot.num_thought_sets={sc.num_thought_sets}; give one per thought set")
