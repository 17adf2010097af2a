"""Load causal LMs and tokenizers: HF name or local path, GGUF file, or tiny random-init configs.

Also owns the latent special tokens (added once, embedding resized once, rows kept trainable under
LoRA), LoRA via peft, 4-bit (QLoRA) loading, dtype and attention implementation.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import SMOLLM2_GGUF, ModelConfig, TinyModelConfig, smollm2_gguf_dir  # noqa: F401 (re-export)
from pipeline.token_rows import add_token_rows, merge_token_rows, token_rows  # noqa: F401 (re-export)

log = logging.getLogger(__name__)

# Every latent special token of every method; all are added so one checkpoint format serves all.
LATENT_TOKENS = {
    "bot": "<bot>",
    "eot": "<eot>",
    "start_latent": "<|start-latent|>",
    "latent": "<|latent|>",
    "end_latent": "<|end-latent|>",
}

# LoRA targets per architecture (config.model_type). The CODI/SIM-CoT recipes adapt every linear
# layer of attention and MLP.
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}



@dataclass
class LoadedModel:
    model: PreTrainedModel           # possibly a peft.PeftModel
    tokenizer: PreTrainedTokenizerBase
    token_ids: dict[str, int]        # LATENT_TOKENS key -> id
    hidden_size: int


def resolve_attn_implementation(requested: str, device: torch.device | str = "cpu") -> str:
    """flash-attention-2 only when installed and on CUDA; otherwise sdpa, with the fallback logged."""
    on_cuda = torch.device(device).type == "cuda"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if (on_cuda and has_flash) else "sdpa"
    if requested == "flash_attention_2" and not (on_cuda and has_flash):
        log.warning("flash_attention_2 requested but %s; falling back to sdpa",
                    "flash-attn is not installed" if not has_flash else "the device is not CUDA")
        return "sdpa"
    return requested


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def tiny_model_config(arch: str, tiny: TinyModelConfig, vocab_size: int):
    """A small random-init LLaMA or GPT-2 configuration (tests and CPU demos)."""
    from transformers import GPT2Config, LlamaConfig

    if arch == "tiny-gpt2":
        return GPT2Config(n_embd=tiny.hidden_size, n_layer=tiny.num_layers, n_head=tiny.num_heads,
                          n_inner=tiny.intermediate_size, vocab_size=vocab_size,
                          n_positions=tiny.max_position_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0)
    return LlamaConfig(hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_layers,
                       num_attention_heads=tiny.num_heads, num_key_value_heads=max(1, tiny.num_heads // 2),
                       intermediate_size=tiny.intermediate_size, vocab_size=vocab_size,
                       max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=False)


def load_tokenizer(cfg: ModelConfig, *, build_dir: str | Path | None = None,
                   build_texts: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer named by the config, the model's own, or (tiny models) one built from data."""
    if cfg.tokenizer:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    elif cfg.name_or_path in ("tiny-llama", "tiny-gpt2"):
        if build_dir is not None and (Path(build_dir) / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(build_dir))
        else:
            if build_texts is None or build_dir is None:
                raise ValueError("model.tokenizer: tiny models need a tokenizer path or texts to build one from")
            from pipeline.tokenizer_build import build_tokenizer
            tok = build_tokenizer(build_texts, build_dir, vocab_size=cfg.tiny.vocab_size)
    else:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file,
                                            trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    add_latent_tokens(tok)
    return tok


def add_latent_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add the latent tokens as real special tokens (idempotent) and return their ids."""
    missing = [t for t in LATENT_TOKENS.values() if t not in tokenizer.get_vocab()]
    if missing:
        # transformers 5 renamed additional_special_tokens to extra_special_tokens (and the flag).
        if "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        else:
            tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                         replace_additional_special_tokens=False)
    return {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in LATENT_TOKENS.items()}


def load_base_model(cfg: ModelConfig, vocab_size: int, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The plain causal LM (no LoRA), its embedding not yet resized."""
    dtype = torch_dtype(cfg.dtype)
    attn = resolve_attn_implementation(cfg.attn_implementation, device)
    if cfg.name_or_path in ("tiny-llama", "tiny-gpt2"):
        config = tiny_model_config(cfg.name_or_path, cfg.tiny, vocab_size)
        config._attn_implementation = attn if attn != "flash_attention_2" else "sdpa"
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    if cfg.gguf_file:
        _forget_gguf_quantizer(model)
    return model


def _forget_gguf_quantizer(model: PreTrainedModel) -> None:
    """transformers dequantizes GGUF tensors into ordinary float weights on load, but keeps a GGUF
    "quantizer" marker that makes save_pretrained refuse to export; the weights are plain tensors, so
    drop the marker (exports then reload with plain `from_pretrained`)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, device: str | torch.device = "cpu",
               lora: bool | None = None) -> LoadedModel:
    """Model + tokenizer with latent tokens, resized once, LoRA applied when configured."""
    token_ids = add_latent_tokens(tokenizer)
    model = load_base_model(cfg, len(tokenizer), device)
    old_vocab = model.get_input_embeddings().num_embeddings
    if old_vocab != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _init_new_rows_from_statistics(model, old_vocab)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.name_or_path in ("tiny-llama", "tiny-gpt2"):
        # Random-init configs carry the architecture's default special ids (LLaMA: eos 2), which in
        # a tokenizer built from our data are ordinary tokens: generation would stop on them.
        for target in (model.config, model.generation_config):
            target.bos_token_id, target.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
            target.pad_token_id = tokenizer.pad_token_id
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled if lora is None else lora:
        model = apply_lora(model, cfg, new_token_ids=sorted(token_ids.values()))
    return LoadedModel(model=model, tokenizer=tokenizer, token_ids=token_ids,
                       hidden_size=model.config.get_text_config().hidden_size)


@torch.no_grad()
def _init_new_rows_from_statistics(model: PreTrainedModel, old_vocab: int) -> None:
    """New token rows (input and, if untied, output embedding) drawn from the existing rows'
    per-dimension mean and std, so a pretrained model sees them at its own scale rather than at
    `initializer_range` noise (which matters where they stay frozen, e.g. SoftCoT's delimiters).

    transformers' `mean_resizing` does this with the full d x d covariance, which costs minutes
    at LLaMA-8B scale (128k x 4096); the diagonal is enough for a starting point.
    """
    generator = torch.Generator().manual_seed(0)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    for weight in matrices:
        if weight.shape[0] <= old_vocab:
            continue
        old = weight[:old_vocab].float()
        noise = torch.randn(weight.shape[0] - old_vocab, weight.shape[1], generator=generator)
        weight[old_vocab:] = (old.mean(0) + noise * old.std(0)).to(weight.dtype)


def lora_targets(model: PreTrainedModel, cfg: ModelConfig) -> list[str]:
    if cfg.lora.target_modules:
        return list(cfg.lora.target_modules)
    model_type = model.config.model_type
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ValueError(f"model.lora.target_modules: no default for architecture {model_type!r}; "
                         f"set it explicitly (known: {', '.join(DEFAULT_LORA_TARGETS)})")
    return DEFAULT_LORA_TARGETS[model_type]


def apply_lora(model: PreTrainedModel, cfg: ModelConfig, *, new_token_ids: list[int],
               adapter_name: str = "default"):
    """Wrap with peft LoRA; the latent tokens' embedding rows stay trainable.

    Only those rows train (the reference CODI leaves them frozen at their random init), through a
    [k, d] delta on the frozen matrix (pipeline.token_rows), not peft's `trainable_token_indices`,
    which copies the whole matrix on every call (issue 12.4), nor `modules_to_save`.
    """
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=lora_targets(model, cfg), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora_cfg, adapter_name=adapter_name)
    add_token_rows(model.get_base_model(), new_token_ids)
    return model


def unwrap_base(model) -> PreTrainedModel:
    """The transformers model under a peft wrapper (shares parameters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def meta_model(cfg: ModelConfig, vocab_size: int | None = None) -> PreTrainedModel:
    """The architecture on the meta device: parameter counts without allocating weights (--plan)."""
    from transformers import AutoConfig

    if cfg.name_or_path in ("tiny-llama", "tiny-gpt2"):
        config = tiny_model_config(cfg.name_or_path, cfg.tiny, vocab_size or cfg.tiny.vocab_size)
    else:
        config = AutoConfig.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file,
                                            trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
