"""Issue 12.4: the latent tokens' embedding rows train through a [k, d] delta on the frozen matrix
(pipeline/token_rows.py), tied and untied, under ZeRO-3, and export merged into a plain model."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pipeline.config import LoraConfig, ModelConfig, TinyModelConfig
from pipeline.models import apply_lora
from pipeline.token_rows import TokenRowsEmbedding, TokenRowsHead, add_token_rows, merge_token_rows, token_rows

VOCAB, NEW = 64, [59, 60, 63]
IDS = torch.tensor([[5, 59, 17, 60, 42], [63, 8, 8, 59, 31]])


def tiny(tied: bool, arch: str = "llama"):
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                        tie_word_embeddings=tied))


def lora_cfg():
    return ModelConfig(lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))


def set_delta(model, seed=3):
    rows = token_rows(model)
    with torch.no_grad():
        rows.weight.copy_(torch.randn(rows.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return rows


def reference(model, delta, tied: bool):
    """A plain model whose matrix has the delta written into the new rows (fully trainable)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.get_input_embeddings().weight[NEW] += delta
    assert (ref.get_output_embeddings().weight is ref.get_input_embeddings().weight) == tied
    return ref


@pytest.mark.parametrize("tied,arch", [(False, "llama"), (True, "llama"), (True, "gpt2")])
def test_delta_equals_editing_the_rows_outputs_and_gradients(tied, arch):
    """Logits, loss and the new rows' gradient equal a model whose rows hold the delta; with a tied
    head the gradient includes the head's part (the same matrix)."""
    plain = tiny(tied, arch)
    model = copy.deepcopy(plain)
    rows = add_token_rows(model, NEW)
    assert isinstance(model.get_input_embeddings(), TokenRowsEmbedding)
    assert isinstance(model.get_output_embeddings(), TokenRowsHead) == tied
    set_delta(model)
    ref = reference(plain, rows.weight.detach(), tied)
    out, want = model(input_ids=IDS, labels=IDS), ref(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(rows.weight.grad, ref.get_input_embeddings().weight.grad[NEW], rtol=1e-4, atol=1e-6)
    assert model.get_input_embeddings().weight.grad is None          # the matrix stays frozen


def test_lora_trains_the_new_rows_only_and_the_matrix_stays_put():
    model = apply_lora(tiny(False), lora_cfg(), new_token_ids=NEW)
    matrix = model.get_input_embeddings().weight.detach().clone()
    rows = token_rows(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable), trainable
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = model(input_ids=IDS, labels=IDS).loss.item()
    for _ in range(5):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    assert model(input_ids=IDS, labels=IDS).loss.item() < before
    assert rows.weight.detach().abs().sum(-1).min() > 0                # every new row moved
    torch.testing.assert_close(model.get_input_embeddings().weight, matrix, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_export_merges_rows_into_a_plain_model_that_reloads_with_equal_logits(tmp_path, tied, mode):
    """The export path of pipeline.export: LoRA merged (or saved as an adapter beside the base),
    the rows folded into the matrix; plain transformers (+ peft for the adapter) reloads it."""
    model = apply_lora(tiny(tied), lora_cfg(), new_token_ids=NEW)
    set_delta(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        live = model(input_ids=IDS).logits
    if mode == "merged":                          # what pipeline.export does, per export_merge_lora
        base = model.merge_and_unload()
    else:
        model.save_pretrained(str(tmp_path))      # the LoRA adapter only
        base = model.unload()                     # must keep the trained rows: they are in no adapter
    assert token_rows(base) is None and type(base.get_input_embeddings()) is torch.nn.Embedding
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == tied
    base.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    if mode == "adapter":
        from peft import PeftModel
        reloaded = PeftModel.from_pretrained(reloaded, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, live, rtol=1e-5, atol=1e-5)


def test_pipeline_export_of_a_lora_run_reloads_in_plain_transformers(tmp_path):
    """export_parts (the function training and offline export call) on a LoRA CODI model."""
    from pipeline.config import Config
    from pipeline.export import export_parts, load_exported
    from pipeline.methods import codi
    from pipeline.models import load_model, load_tokenizer
    from pipeline.tokenizer_build import default_tokenizer_texts

    cfg = Config()
    cfg.method.name = "codi"
    cfg.model = ModelConfig(name_or_path="tiny-llama", lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0),
                            tiny=TinyModelConfig(hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=300))
    tok = load_tokenizer(cfg.model, build_dir=tmp_path / "tok", build_texts=default_tokenizer_texts(max_texts=200))
    loaded = load_model(cfg.model, tok)
    parts = codi.build_parts(cfg, loaded)
    set_delta(parts["lm"])
    probe = torch.tensor([sorted(loaded.token_ids.values()) + [5, 17, 42]])
    with torch.no_grad():
        live = parts["lm"](input_ids=probe).logits
    export_parts(parts, cfg, tok, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=probe).logits, live, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_exported(tmp_path / "export").model(input_ids=probe).logits, live,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_merge_token_rows_outside_peft(tied):
    model = tiny(tied)
    add_token_rows(model, NEW)
    set_delta(model)
    with torch.no_grad():
        live = model(input_ids=IDS).logits
        plain = merge_token_rows(model)
        assert token_rows(plain) is None and type(plain.get_input_embeddings()) is torch.nn.Embedding
        assert (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight) == tied
        torch.testing.assert_close(plain(input_ids=IDS).logits, live, rtol=1e-5, atol=1e-5)


def test_adding_rows_twice_is_refused():
    model = tiny(False)
    add_token_rows(model, NEW)
    with pytest.raises(ValueError, match="already has trainable token rows"):
        add_token_rows(model, NEW)


def test_zero3_gathers_the_delta_for_embedding_and_tied_head():
    """One DeepSpeed ZeRO-3 rank with nothing kept resident: every parameter, the delta included, is
    partitioned and gathered around the module calls; loss and the delta's gradient equal plain torch."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from pipeline.strategy import init_distributed

    init_distributed(timeout_s=60)
    plain = tiny(True)
    model = copy.deepcopy(plain)
    add_token_rows(model, NEW)
    delta = set_delta(model).weight.detach().clone()
    ref = reference(plain, delta, tied=True)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0}}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                      optimizer=torch.optim.SGD(params, lr=0.0))
    rows = token_rows(engine.module)
    assert rows.weight.numel() == 0                                   # partitioned outside a forward
    loss = engine(input_ids=IDS, labels=IDS).loss
    engine.backward(loss)
    want = ref(input_ids=IDS, labels=IDS).loss
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(safe_get_full_grad(rows.weight), ref.get_input_embeddings().weight.grad[NEW],
                               rtol=1e-4, atol=1e-6)
