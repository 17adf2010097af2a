"""Tiny SoftCoT model pairs with different tokenizers and hidden sizes, built offline in seconds.

* `llama3_tokenizer`: a byte-level BPE laid out like LLaMA-3's: `<|begin_of_text|>` added by the
  tokenizer, `<|start_header_id|>…<|end_header_id|>` turns closed by `<|eot_id|>` (its EOS), the
  LLaMA-3 chat template, and `<|reserved_special_token_N|>` rows (what SoftCoT++ initialises from).
* `chatml_tokenizer`: the project's digit-splitting BPE with ChatML turns (`<|im_start|>`,
  `<|im_end|>` = EOS), as SmolLM2 and Qwen write them, and no reserved rows.
* `save_model`: a tiny LLaMA saved as a local model directory (config + safetensors + tokenizer),
  which `model.name_or_path` / `method.softcot.assistant_model` load like any checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from pipeline.tokenizer_build import build_tokenizer, default_tokenizer_texts

# LLaMA-3-Instruct's template (without 3.1's system header and tools), written out here: no hub.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   *[f"<|reserved_special_token_{i}|>" for i in range(12)]]


def llama3_tokenizer(out_dir: str | Path, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(default_tokenizer_texts(max_texts=2000), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", clean_up_tokenization_spaces=False,
                                   model_max_length=4096)
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def chatml_tokenizer(out_dir: str | Path, vocab_size: int = 500) -> PreTrainedTokenizerFast:
    fast = build_tokenizer(default_tokenizer_texts(max_texts=2000), out_dir, vocab_size=vocab_size,
                           extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.eos_token = "<|im_end|>"
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def save_model(out_dir: str | Path, tokenizer, hidden: int, seed: int, sharpen: bool = False) -> Path:
    """A 2-layer LLaMA of width `hidden` over `tokenizer`, saved with it. `sharpen`: larger random
    weights, so the model's output depends visibly on its (soft) input and a projection can learn."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    if sharpen:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 1.0 if "embed" in name else 0.3)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def model_pair(root: str | Path) -> tuple[Path, Path]:
    """(base dir: ChatML tokenizer, hidden 32, sharpened; assistant dir: LLaMA-3 tokenizer, hidden 48)."""
    root = Path(root)
    base = save_model(root / "base", chatml_tokenizer(root / "base_tok"), hidden=32, seed=1, sharpen=True)
    assistant = save_model(root / "assistant", llama3_tokenizer(root / "assistant_tok"), hidden=48, seed=2)
    return base, assistant
