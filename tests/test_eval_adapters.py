"""Model adapters on tiny random models: explicit decoding, SoftCoT(++) voting, the latent report,
and loading an exported checkpoint (once pipeline.export exists)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from evaluation.adapters import DecodeConfig, ExplicitAdapter, LatentAdapter
from evaluation.answers import ANSWER_PREFIX
from evaluation.benchmarks import Instance, load_benchmark
from evaluation.latent_report import latent_report, write_latent_report
from evaluation.softcot import SoftCoTAdapter, load_projection

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("eval_tiny_models", HERE / "fixtures" / "eval" / "tiny_models.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(scope="module")
def tok():
    return tiny.load_tiny_tokenizer()


@pytest.fixture(scope="module")
def instances():
    return load_benchmark("gsm8k_aug", HERE / "fixtures" / "gsm8k_aug_test.txt", limit=12).instances


def test_answer_prefix_is_the_pipeline_convention():
    from pipeline.latent import ANSWER_PREFIX as pipeline_prefix

    assert ANSWER_PREFIX == pipeline_prefix


def test_explicit_adapter_batch_invariant_and_chat_template(tok, instances):
    model = tiny.tiny_llama(len(tok), seed=3)
    adapter = ExplicitAdapter(model, tok, model_name="tiny", decode=DecodeConfig(max_new_tokens=5))
    big = adapter.generate(instances, seed=41)
    one = [adapter.generate([i], seed=41)[0] for i in instances]
    assert [g.text for g in big] == [g.text for g in one]
    assert all(g.num_latents == 0 and 1 <= g.num_generated_tokens <= 5 for g in big)
    assert adapter.format_prompt(instances[0]) == instances[0].question + "\n"

    chat_tok = tiny.load_tiny_tokenizer()
    chat_tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}[assistant] {% endif %}")
    chat = ExplicitAdapter(model, chat_tok, chat_template=True, system="Be brief.", instruction="Answer:")
    assert chat.format_prompt(instances[0]) == (f"[system] Be brief.\n[user] {instances[0].question}\nAnswer:\n"
                                                "[assistant] ")


def test_explicit_self_consistency_returns_all_samples(tok, instances):
    model = tiny.tiny_llama(len(tok), seed=3)
    adapter = ExplicitAdapter(model, tok, decode=DecodeConfig(max_new_tokens=3, num_samples=3))
    gens = adapter.generate(instances[:4], seed=7)
    assert all(len(g.samples) == 3 and g.text == g.samples[0] for g in gens)
    again = adapter.generate(instances[:4], seed=7)
    assert [g.samples for g in gens] == [g.samples for g in again]       # seeded


@pytest.fixture(scope="module")
def softcot(tok, tmp_path_factory):
    from safetensors.torch import save_file

    assistant, base = tiny.tiny_llama(len(tok), seed=4, hidden=32), tiny.tiny_llama(len(tok), seed=5, hidden=48)
    torch.manual_seed(6)
    path = tmp_path_factory.mktemp("softcot") / "projection.safetensors"
    lin = torch.nn.Linear(32, 48)
    save_file({"projection.weight": lin.weight.detach(), "projection.bias": lin.bias.detach()}, str(path))
    return assistant, base, load_projection(path)


def test_softcot_greedy_is_batch_invariant_and_splices_thoughts(tok, instances, softcot):
    assistant, base, proj = softcot
    adapter = SoftCoTAdapter(assistant, tok, base, tok, proj, num_thoughts=3, assistant_placeholder="<|latent|>",
                             base_placeholder="<|latent|>", begin="<bot>", end="<eot>",
                             decode=DecodeConfig(max_new_tokens=4, do_sample=False))
    assert adapter.method == "softcot" and not adapter.chat_template      # tiny tokenizer has no template
    big = adapter.generate(instances[:6], seed=41)
    one = [adapter.generate([i], seed=41)[0] for i in instances[:6]]
    assert [g.text for g in big] == [g.text for g in one]
    assert all(g.num_latents == 3 for g in big)
    # The base model reads the projected thoughts in its placeholder slots, between begin and end.
    qs = [instances[0].question, instances[1].question]
    th = adapter.thoughts(qs, "", 3)
    assert th.shape == (2, 3, 48)
    seen = []
    hook = base.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["inputs_embeds"].clone()),
                                          with_kwargs=True)
    try:
        adapter.decode_with_thoughts(qs, th, None)
    finally:
        hook.remove()
    from pipeline.latent import left_pad

    ids, _ = left_pad([tok(adapter.base_prompt(q, 3)).input_ids for q in qs], tok.pad_token_id)
    slots = ids == tok.convert_tokens_to_ids("<|latent|>")
    torch.testing.assert_close(seen[0][slots], th.reshape(-1, 48))
    bot = (ids == tok.convert_tokens_to_ids("<bot>")).int().argmax(-1)
    assert bool(slots[torch.arange(2), bot + 1].all())


def test_softcot_plus_plus_votes_over_sets_and_samples(tok, instances, softcot):
    assistant, base, proj = softcot
    adapter = SoftCoTAdapter(assistant, tok, base, tok, proj, num_thoughts=2, assistant_placeholder="<|latent|>",
                             base_placeholder="<|latent|>", initial_tokens=["<bot>", "<eot>", "<|start-latent|>"],
                             decode=DecodeConfig(max_new_tokens=3, do_sample=True, num_samples=2))
    assert adapter.method == "softcot++"
    gens = adapter.generate(instances[:3], seed=41)
    assert all(len(g.samples) == 6 and g.num_latents == 6 for g in gens)


def test_latent_report(tok, instances, tmp_path):
    model = tiny.tiny_llama(len(tok), seed=0)

    class StubDecoder:      # the interface the report expects from Exported.step_decoder
        def decode_latents(self, latents, max_new_tokens=48):
            return [f"step from latent of norm {float(v.norm()):.1f}" for v in latents]

    adapter = LatentAdapter(model, tok, num_latents=3, start_token="<bot>", end_token="<eot>",
                            projection=tiny.codi_projection(32), step_decoder=StubDecoder(),
                            decode=DecodeConfig(max_new_tokens=4))
    records = latent_report(adapter, instances[:3], top_k=4, batch_size=2)
    assert len(records) == 3 and all(len(r["latents"]) == 3 for r in records)
    lat = records[0]["latents"][0]
    assert len(lat["top_k"]) == 4 and len(lat["nearest"]) == 4
    assert lat["reference"] == instances[0].reference_steps[0] and lat["step_decoder"].startswith("step from")
    assert sum(p for _, p in lat["top_k"]) <= 1.0 + 1e-6
    # Same raw text as the adapter's own decoding.
    assert [r["raw"] for r in records] == [g.text for g in adapter.generate(instances[:3], seed=0)]
    files = write_latent_report(records, tmp_path)
    md = Path(files["markdown"]).read_text()
    assert "| latent | step decoder | top-k (LM head) | nearest embeddings | reference step |" in md
    assert len(Path(files["jsonl"]).read_text().splitlines()) == 3


def test_latent_report_pairs_each_latent_with_the_step_it_was_trained_on(tok, instances):
    """Trained with c = 2 latents per step (method.simcot.latents_per_step, recorded in the export's
    meta), latents 2k and 2k+1 both stand for step k: comparing latent 1 with step 1 scored a
    correct decoding as wrong (simcot_2x's report read 0 % for latent 1)."""
    model = tiny.tiny_llama(len(tok), seed=0)
    inst = next(i for i in instances if len(i.reference_steps) >= 2)
    short = next(i for i in instances if len(i.reference_steps) < 3)

    def adapter(meta):
        return LatentAdapter(model, tok, num_latents=6, start_token="<bot>", end_token="<eot>",
                             projection=tiny.codi_projection(32), decode=DecodeConfig(max_new_tokens=2), meta=meta)

    def references(records):
        return [[lat["reference"] for lat in r["latents"]] for r in records]

    s = inst.reference_steps
    paired = references(latent_report(adapter({"step_decoder": {"kind": "full", "latents_per_step": 2}}), [inst, short]))
    assert paired[0] == [s[0], s[0], s[1], s[1], *([s[2], s[2]] if len(s) > 2 else [None, None])]
    t = short.reference_steps
    assert paired[1] == [t[0], t[0], *([t[1], t[1]] if len(t) > 1 else [None, None]), None, None]
    # An export without the field (written before it existed): one latent per step, or the caller says.
    assert references(latent_report(adapter({}), [inst]))[0][:2] == [s[0], s[1]]
    assert references(latent_report(adapter({}), [inst], latents_per_step=2))[0][:2] == [s[0], s[0]]


def test_latent_adapter_from_an_exported_checkpoint(tok, instances, tmp_path):
    """A directory in the exported format of docs/DESIGN.md, written by hand, evaluates exactly
    like the in-memory model it came from."""
    export = pytest.importorskip("pipeline.export")
    if not hasattr(export, "load_exported"):
        pytest.skip("pipeline.export.load_exported not there yet")
    from safetensors.torch import save_file

    model, proj = tiny.tiny_llama(len(tok), seed=9), tiny.codi_projection(32, seed=10)
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    save_file({f"projection.{k}": v.contiguous() for k, v in proj.state_dict().items()},
              str(tmp_path / "latent_extra.safetensors"))
    meta = {"method": "codi", "num_latents": 2, "start_token": "<bot>", "end_token": "<eot>",
            "projection": {"kind": "codi_mlp", "hidden_size": 32, "inner_size": 32},
            "answer_prefix": ANSWER_PREFIX, "has_step_decoder": False, "lora": "merged",
            "base_model": "tiny-llama", "format_version": 1}
    (tmp_path / "latent_meta.json").write_text(json.dumps(meta))
    loaded = LatentAdapter.from_exported(tmp_path, decode=DecodeConfig(max_new_tokens=5))
    direct = LatentAdapter(model, tok, num_latents=2, start_token="<bot>", end_token="<eot>", projection=proj,
                           decode=DecodeConfig(max_new_tokens=5))
    assert loaded.method == "codi" and loaded.default_num_latents == 2 and loaded.model_name == "tiny-llama"
    assert [g.text for g in loaded.generate(instances, 41)] == [g.text for g in direct.generate(instances, 41)]


def test_prosqa_oracle_prompt_convention():
    inst = Instance(id="0", question="  Is Tom a wumpus or zumpus?  ", gold="Tom is a wumpus.", kind="prosqa")
    from evaluation.adapters import prompt_for

    assert prompt_for(inst) == "Is Tom a wumpus or zumpus?\n"
    assert json.dumps(inst.__dict__)        # instances serialise
