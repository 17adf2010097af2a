"""A small byte-level BPE tokenizer trained from the shipped data, for tiny test models.

Tiny models in tests and demos need a tokenizer that exists offline and trains in seconds.
This one is GPT-2-like (byte-level BPE, ``<|endoftext|>`` as bos/eos/pad/unk) except that every
digit is its own token: with multi-digit merges a tiny model would have to memorise arithmetic
per number chunk, while single digits make it learnable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["DEFAULT_TEXT_FILES", "EOS_TOKEN", "FIXTURES_DIR", "build_tokenizer", "default_tokenizer_texts", "file_texts"]

EOS_TOKEN = "<|endoftext|>"
FIXTURES_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures"

# The shipped fixture files the default texts come from (see tests/fixtures/make_fixtures.py).
# Named, not globbed, so fixtures other tests add later cannot change the default tokenizer.
DEFAULT_TEXT_FILES = (
    "gsm8k_aug_train.txt",
    "gsm8k_aug_test.txt",
    "gsm8k_train.jsonl",
    "prosqa_small.json",
    "prontoqa_small.json",
)

# Strings every method's sequences contain; training on them gives them compact tokens.
_TEMPLATE_TEXTS = ("The answer is: ", "\n", "True", "False")
# A task's own BPE (the study, latent-make-task): its words become single tokens, so sequences stay short.
TASK_VOCAB_SIZE = 1000


def build_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` reloads it. ``<|endoftext|>`` is bos, eos, pad and
    unk (byte-level BPE never needs unk, but some code asks for one). ``extra_special_tokens``
    (e.g. latent markers) are added as real special tokens; in transformers 5 they are stored
    under ``extra_special_tokens``. Encoding adds no bos/eos: callers append eos explicitly, as the
    text conventions in docs/DESIGN.md do.
    """
    if vocab_size < 300:
        # 256 byte symbols + the special tokens must fit, with room for some merges.
        raise ValueError(f"vocab_size must be >= 300 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Digits first so that BPE (which only merges inside one pre-token) can never merge them;
    # then GPT-2's byte-level split. add_prefix_space=False keeps decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [EOS_TOKEN, *[t for t in extra_special_tokens if t != EOS_TOKEN]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_with_templates(texts), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        extra_special_tokens=list(special[1:]),
        clean_up_tokenization_spaces=False,  # exact round trips: no " ." → "." rewriting
        model_max_length=4096,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def _with_templates(texts: Iterable[str]) -> Iterator[str]:
    yield from _TEMPLATE_TEXTS
    yield from texts


def _strings(value: object) -> Iterator[str]:
    """All string leaves of a JSON value (question, steps, answer, ...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def default_tokenizer_texts(
    data_dir: str | Path = FIXTURES_DIR, max_texts: int = 5000
) -> list[str]:
    """Up to ``max_texts`` training texts from the :data:`DEFAULT_TEXT_FILES` in ``data_dir``.

    ``.txt`` files give their lines with the GSM8k-Aug separators turned into newlines (as the
    models see them); ``.json``/``.jsonl`` files give every string value of their records. The
    order is fixed, so the result, and the tokenizer trained on it, is reproducible.
    """
    data_dir = Path(data_dir)
    paths = [data_dir / name for name in DEFAULT_TEXT_FILES if (data_dir / name).exists()]
    if not paths:
        raise FileNotFoundError(f"none of {DEFAULT_TEXT_FILES} found in {data_dir}")
    texts: list[str] = []
    for path in paths:
        if len(texts) >= max_texts:
            break
        texts.extend(file_texts(path))
    return texts[:max_texts]


def file_texts(path: str | Path) -> list[str]:
    """The texts a model sees in one data file: ``.txt`` GSM8k-Aug lines with the separators turned
    into newlines and the answer prefix; ``.json``/``.jsonl``: every string value of the records."""
    path = Path(path)
    texts: list[str] = []
    if path.suffix == ".txt":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(line.replace("||", "\n").replace(" #### ", "\nThe answer is: "))
    elif path.suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(_strings(json.loads(line)))
    elif path.suffix == ".json":
        texts.extend(_strings(json.loads(path.read_text(encoding="utf-8"))))
    return texts
