"""Tests for pipeline.tokenizer_build: train, round trip, digit splitting, reload."""

from __future__ import annotations

import pytest

from pipeline.tokenizer_build import EOS_TOKEN, build_tokenizer, default_tokenizer_texts

LATENT_TOKENS = ["<bot>", "<eot>"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small tokenizer for the whole module (training takes about a second)."""
    out = tmp_path_factory.mktemp("tok")
    tok = build_tokenizer(default_tokenizer_texts(), out, vocab_size=600,
                          extra_special_tokens=LATENT_TOKENS)
    return tok, out


def test_default_texts_are_reproducible():
    texts = default_tokenizer_texts()
    assert len(texts) > 1000
    assert texts == default_tokenizer_texts()
    assert any("<<" in t for t in texts)
    assert len(default_tokenizer_texts(max_texts=10)) == 10


def test_round_trip_and_special_tokens(built):
    tok, _ = built
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nThe answer is: 1,234"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(tok) <= 600
    assert tok.eos_token == tok.pad_token == tok.bos_token == EOS_TOKEN
    # No bos/eos added implicitly; the special tokens encode to one id each.
    assert tok(EOS_TOKEN)["input_ids"] == [tok.eos_token_id]
    assert tok("<bot><eot>")["input_ids"] == tok.convert_tokens_to_ids(LATENT_TOKENS)


def test_digits_are_split(built):
    tok, _ = built
    pieces = tok.convert_ids_to_tokens(tok("12345 and 2024")["input_ids"])
    digits = [p.lstrip("Ġ") for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("12345") + list("2024")


def test_reload_from_dir(built):
    from transformers import AutoTokenizer

    tok, out = built
    again = AutoTokenizer.from_pretrained(str(out))
    text = "Every wumpus is a yumpus. <<3*4=12>>\nThe answer is: 12"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token_id == tok.eos_token_id and again.pad_token == EOS_TOKEN
    assert again.convert_tokens_to_ids(LATENT_TOKENS) == tok.convert_tokens_to_ids(LATENT_TOKENS)
    assert again.decode(again(text)["input_ids"]) == text


def test_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], tmp_path, vocab_size=100)
