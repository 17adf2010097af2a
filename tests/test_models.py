"""Model loading: tiny configs, latent special tokens, LoRA with trainable token rows, attention
fallback, 4-bit loading, and the meta-device model used by the planner."""
import logging

import pytest
import torch

from pipeline.config import ModelConfig, LoraConfig, TinyModelConfig
from pipeline.models import (LATENT_TOKENS, add_latent_tokens, load_model, load_tokenizer, meta_model,
                             resolve_attn_implementation)
from pipeline.tokenizer_build import default_tokenizer_texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    load_tokenizer(ModelConfig(), build_dir=out, build_texts=default_tokenizer_texts(max_texts=300))
    return out


def tiny_cfg(arch="tiny-llama", **kw):
    return ModelConfig(name_or_path=arch, tiny=TinyModelConfig(hidden_size=32, num_heads=4, intermediate_size=64,
                                                               vocab_size=400), **kw)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_latent_tokens_added_once_and_embedding_resized(arch, tok_dir):
    cfg = tiny_cfg(arch)
    tok = load_tokenizer(cfg, build_dir=tok_dir)
    n = len(tok)
    assert add_latent_tokens(tok) == add_latent_tokens(tok)       # idempotent
    assert len(tok) == n
    loaded = load_model(cfg, tok)
    assert loaded.model.get_input_embeddings().num_embeddings == len(tok)
    assert loaded.model.get_output_embeddings().weight.shape[0] == len(tok)
    for key, text in LATENT_TOKENS.items():
        ids = tok(f"x {text} y").input_ids
        assert loaded.token_ids[key] in ids                       # one real special token, never split
        assert tok.decode([loaded.token_ids[key]]) == text


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_lora_trains_adapters_and_latent_token_rows_only(arch, tok_dir):
    cfg = tiny_cfg(arch, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    tok = load_tokenizer(cfg, build_dir=tok_dir)
    loaded = load_model(cfg, tok)
    model = loaded.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable), trainable
    bot = loaded.token_ids["bot"]
    ids = torch.tensor([tok("12 + 3").input_ids + [bot] + tok(" = 15").input_ids])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n or "trainable" in n)
    # The latent token's embedding actually changes the output: its rows are live, not frozen noise.
    delta = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert delta and delta[0].shape[0] == len(LATENT_TOKENS)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_attention_fallback_is_logged(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_attn_implementation("flash_attention_2", "cpu") == "sdpa"
    assert "falling back to sdpa" in caplog.text
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"


def test_meta_model_counts_without_weights():
    cfg = tiny_cfg()
    model = meta_model(cfg, vocab_size=400)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 0


def test_bf16_dtype(tok_dir):
    cfg = tiny_cfg(dtype="bf16")
    loaded = load_model(cfg, load_tokenizer(cfg, build_dir=tok_dir))
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_4bit_qlora_loads_and_backpropagates(tok_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_cfg()
    tok = load_tokenizer(cfg, build_dir=tok_dir)
    load_model(cfg, tok).model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    qcfg = ModelConfig(name_or_path=str(tmp_path / "m"), load_in_4bit=True,
                       lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    loaded = load_model(qcfg, load_tokenizer(qcfg))
    linear = loaded.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit"
    ids = torch.tensor([tok("1 + 2 = 3").input_ids])
    loaded.model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None for n, p in loaded.model.named_parameters() if "lora_B" in n)


def test_gradient_checkpointing_keeps_loss_and_gradients(tok_dir):
    """The option is real (CoT/No-CoT; latent methods reject it in the config) and changes nothing
    but memory: same loss and gradients as without it."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = tiny_cfg(gradient_checkpointing=checkpointing)
        loaded = load_model(cfg, load_tokenizer(cfg, build_dir=tok_dir))
        loaded.model.train()
        assert loaded.model.is_gradient_checkpointing == checkpointing
        ids = torch.tensor([loaded.tokenizer("12 + 3 = 15").input_ids] * 2)
        loss = loaded.model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), loaded.model.get_input_embeddings().weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_new_token_rows_match_the_pretrained_scale(tok_dir, tmp_path):
    """Latent-token rows start at the pretrained rows' per-dimension mean/std, not at init noise:
    a "pretrained" model whose embeddings are 10x the init scale gets new rows at that scale."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import tiny_model_config

    base_tok = AutoTokenizer.from_pretrained(str(tok_dir))          # saved before latent tokens were added
    assert LATENT_TOKENS["bot"] not in base_tok.get_vocab()
    pretrained = AutoModelForCausalLM.from_config(tiny_model_config("tiny-llama", tiny_cfg().tiny, len(base_tok)))
    with torch.no_grad():
        pretrained.get_input_embeddings().weight.mul_(10)
        pretrained.get_output_embeddings().weight.mul_(10)
    pretrained.save_pretrained(tmp_path / "m")
    base_tok.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"))
    loaded = load_model(cfg, load_tokenizer(cfg))
    old_vocab = len(base_tok)
    for weight in (loaded.model.get_input_embeddings().weight, loaded.model.get_output_embeddings().weight):
        old, new = weight[:old_vocab], weight[old_vocab:]
        assert new.shape[0] == len(LATENT_TOKENS)
        assert not torch.allclose(new[0], new[1])                      # distinct rows
        ratio = float(new.std() / old.std())
        assert 0.5 < ratio < 2.0, ratio
