"""The real SmolLM2-135M-Instruct (GGUF): one training step of every method, and the answer
position found from its own tokenization. The model is loaded once per session (conftest)."""
import torch
from conftest import make_cfg

from pipeline.data import Example
from pipeline.methods import StepContext, method_module

EXAMPLES = [
    Example(question="Tom has 3 apples and buys 4 more. How many?", steps=("<<3+4=7>>",), answer="7",
            source_id="a"),
    Example(question="A box holds 6 eggs. How many eggs are in 3 boxes plus 2?",
            steps=("<<6*3=18>>", "<<18+2=20>>"), answer="20", source_id="b"),
]


def smol_cfg(model_cfg, method, **fields):
    cfg = make_cfg(method, **fields)
    cfg.model = model_cfg
    cfg.method.num_latents = 2
    cfg.method.coconut.max_latent_stage = 1
    cfg.method.simcot.max_step_tokens = 12
    return cfg


def test_answer_position_with_smollm2_tokenizer(smollm2):
    model_cfg, loaded = smollm2
    tok = loaded.tokenizer
    cfg = smol_cfg(model_cfg, "codi")
    codi = method_module("codi")
    batch = codi.make_collate(cfg, loaded, None)(EXAMPLES)
    for i, ex in enumerate(EXAMPLES):
        for who in ("teacher", "student"):
            ids = batch[f"{who}_suffix_ids"][i]
            pos = int(batch[f"{who}_pos"][i])
            # SmolLM2 splits " 18" into 'Ġ', '1', '8': the lone space predicts the first digit.
            assert tok.convert_ids_to_tokens(int(ids[pos])) == "Ġ"
            assert tok.decode(ids[pos + 1: pos + 1 + len(ex.answer)]) == ex.answer
            assert tok.decode(ids[: pos + 1]).endswith("The answer is: ")


def test_one_step_of_every_method(smollm2):
    model_cfg, loaded = smollm2
    lm = loaded.model
    # The shared decoder adds an adapter to the session's model: it runs last, and is removed after.
    runs = [("cot", {}, 0), ("nocot", {}, 0), ("coconut", {}, 1), ("codi", {}, 0),
            ("simcot", {"simcot__decoder": "separate", "simcot__decoder_model": "tiny-llama"}, 0),
            ("simcot", {"simcot__decoder": "shared", "simcot__decoder_lora_r": 2}, 0)]
    try:
        for method, fields, stage in runs:
            cfg = smol_cfg(model_cfg, method, **fields)
            module = method_module(method)
            torch.manual_seed(0)
            parts = module.build_parts(cfg, loaded)
            batch = module.make_collate(cfg, loaded, parts)(EXAMPLES, stage)
            lm.zero_grad(set_to_none=True)
            loss, logs = module.compute_loss(parts, batch, cfg, StepContext(stage=stage))
            loss.backward()
            assert torch.isfinite(loss), (method, logs)
            assert all(torch.isfinite(v) for v in logs.values()), (method, logs)
            lora_grads = [p.grad for n, p in lm.named_parameters() if "lora_B.default" in n]
            assert lora_grads and all(g is not None for g in lora_grads), method
            if method == "simcot":
                assert logs["step_decoder"] > 0
    finally:
        from pipeline.methods.step_decoder import ADAPTER_NAME
        if ADAPTER_NAME in lm.peft_config:
            lm.delete_adapter(ADAPTER_NAME)
        lm.zero_grad(set_to_none=True)
