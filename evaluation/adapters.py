"""Model adapters: ``generate(instances, seed, num_latents=None) -> list[Generation]`` for one batch.

An adapter turns a batch of :class:`~evaluation.benchmarks.Instance` into raw texts; it never parses
answers (that is :mod:`evaluation.answers`) and never writes files (that is the runner).

- :class:`OracleAdapter` / :class:`ConstantAdapter`: gold / fixed answers, to validate every loader
  and parser end to end.
- :class:`ExplicitAdapter`: any causal LM (CoT-SFT, No-CoT, instruct models; chat template optional).
- :class:`LatentAdapter`: an exported Coconut / CODI / SIM-CoT checkpoint (``<bot>``, ``n`` latents
  over the KV cache, ``<eot>``, decoding) through :func:`pipeline.decoding.generate_with_latents`.
- :class:`~evaluation.softcot.SoftCoTAdapter`: SoftCoT / SoftCoT++ (assistant + projection + base).
- :class:`PredictionsFileAdapter`: re-score an existing predictions JSONL.

Self-consistency: with ``num_samples > 1`` an adapter returns every sampled text in
``Generation.samples`` and the runner scores their majority answer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from evaluation.answers import ANSWER_PREFIX
from evaluation.benchmarks import Instance

__all__ = [
    "Generation", "Adapter", "OracleAdapter", "ConstantAdapter", "ExplicitAdapter", "LatentAdapter",
    "PredictionsFileAdapter", "batch_generator", "resolve_attn", "prompt_for",
]


@dataclass
class Generation:
    text: str
    num_generated_tokens: int = 0
    num_latents: int = 0
    samples: list[str] | None = None        # every sampled text when self-consistency is on


class Adapter(Protocol):
    """What the runner needs from a model."""

    method: str          # "codi", "simcot", "cot", … (published-number lookup, report labels)
    model_name: str      # "meta-llama/Llama-3.2-1B-Instruct", "oracle", …
    default_num_latents: int | None   # None: the adapter has no latent count to sweep

    def generate(self, instances: Sequence[Instance], seed: int,
                 num_latents: int | None = None) -> list[Generation]: ...

    def describe(self) -> dict: ...


def prompt_for(inst: Instance) -> str:
    """The text convention shared with training (:func:`pipeline.latent.question_prompt`)."""
    from pipeline.latent import question_prompt

    return question_prompt(inst.question)


def instance_seed(seed: int, inst: Instance, sample: int = 0, salt: str = "") -> int:
    """A 63-bit seed from (run seed, benchmark, instance id, sample index[, salt]) alone."""
    key = f"{int(seed)}|{inst.benchmark}|{inst.id}|{sample}|{salt}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def batch_generator(seed: int, instances: Sequence[Instance], device="cpu", num_samples: int = 1,
                    salt: str = ""):
    """One torch.Generator per decoded row (instance × sample, in that order), each seeded by
    :func:`instance_seed`.

    Every sampled output then depends only on (seed, benchmark, instance id, sample index), never on
    the batch size, the other rows of the batch, the rank count or where a resumed run restarted.
    """
    import torch

    return [torch.Generator(device=device).manual_seed(instance_seed(seed, inst, j, salt))
            for inst in instances for j in range(num_samples)]


def resolve_attn(requested: str, device: str) -> str:
    """flash-attention-2 when asked for (or "auto") and usable: installed and on CUDA; else sdpa."""
    import importlib.util

    usable = str(device).startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
    if requested in ("auto", "flash_attention_2"):
        return "flash_attention_2" if usable else "sdpa"
    return requested


def _set_attn(model, attn: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None and attn:
        try:
            setter(attn)
        except (ValueError, ImportError):      # architecture without that kernel: keep the default
            pass


# --------------------------------------------------------------------------- validation adapters
class OracleAdapter:
    """Answers every question with its gold answer, in the trained format."""

    method, model_name, default_num_latents = "oracle", "oracle", None

    def generate(self, instances, seed, num_latents=None):
        return [Generation(text=f"{ANSWER_PREFIX}{inst.gold}") for inst in instances]

    def describe(self) -> dict:
        return {"adapter": "oracle"}


class ConstantAdapter:
    """Answers every question of a kind with the same answer (defaults: 0, A, True, a fixed ProsQA sentence)."""

    method, model_name, default_num_latents = "constant", "constant", None
    DEFAULTS = {"numeric": "0", "choice": "A", "bool": "True", "prosqa": "Tom is a wumpus."}

    def __init__(self, answers: dict[str, str] | str | None = None) -> None:
        if isinstance(answers, str):
            answers = {k: answers for k in self.DEFAULTS}
        self.answers = {**self.DEFAULTS, **(answers or {})}

    def generate(self, instances, seed, num_latents=None):
        return [Generation(text=f"{ANSWER_PREFIX}{self.answers[inst.kind]}") for inst in instances]

    def describe(self) -> dict:
        return {"adapter": "constant", "answers": self.answers}


class PredictionsFileAdapter:
    """Re-score a JSONL of existing predictions, matched by ``id`` (else by question text).

    Each line needs ``id`` or ``question`` and the generated text under one of ``raw``, ``text``,
    ``output``, ``response``, ``completion`` or ``prediction``; optional ``benchmark`` narrows the
    match, optional ``generated_tokens`` / ``latents_used`` are kept.
    """

    TEXT_FIELDS = ("raw", "text", "output", "response", "completion", "prediction")
    default_num_latents = None

    def __init__(self, path: str | Path, benchmark: str | None = None, method: str = "predictions",
                 model_name: str | None = None) -> None:
        self.path, self.method = str(path), method
        self.model_name = model_name or Path(path).stem
        self.by_id: dict[tuple, dict] = {}
        self.by_question: dict[tuple, dict] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
                if not any(k in row for k in self.TEXT_FIELDS):
                    raise ValueError(f"{path}:{lineno}: field 'raw': missing (or any of {self.TEXT_FIELDS})")
                bench = row.get("benchmark")
                if "id" in row:
                    self.by_id[(bench, str(row["id"]))] = row
                if "question" in row:
                    self.by_question[(bench, str(row["question"]).strip())] = row
        self.benchmark = benchmark

    def set_benchmark(self, name: str) -> None:
        self.benchmark = name

    def _row(self, inst: Instance) -> dict:
        for bench in (self.benchmark, None):
            row = self.by_id.get((bench, inst.id)) or self.by_question.get((bench, inst.question.strip()))
            if row is not None:
                return row
        raise KeyError(f"{self.path}: no prediction for instance id {inst.id!r} ({inst.source})")

    def generate(self, instances, seed, num_latents=None):
        out = []
        for inst in instances:
            row = self._row(inst)
            text = next(str(row[k]) for k in self.TEXT_FIELDS if k in row and row[k] is not None)
            out.append(Generation(text=text, num_generated_tokens=int(row.get("generated_tokens") or 0),
                                  num_latents=int(row.get("latents_used") or 0)))
        return out

    def describe(self) -> dict:
        return {"adapter": "predictions", "path": self.path}


# --------------------------------------------------------------------------- model adapters
@dataclass
class DecodeConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1          # > 1: self-consistency (sampling on, majority vote)


def _group(texts: list[str], counts: list[int], k: int, num_latents: int) -> list[Generation]:
    """Rows were repeated ``k`` times in order; regroup them per instance."""
    out = []
    for i in range(0, len(texts), k):
        chunk = texts[i:i + k]
        out.append(Generation(text=chunk[0], num_generated_tokens=sum(counts[i:i + k]),
                              num_latents=num_latents * k, samples=chunk if k > 1 else None))
    return out


def _prepare(tokenizer, decode: DecodeConfig) -> DecodeConfig:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if decode.num_samples > 1:
        decode.do_sample = True          # self-consistency needs different samples
    return decode


def _decode(model, tokenizer, decode: DecodeConfig, prompts: list[str], instances, seed: int,
            **latent_kw) -> list[Generation]:
    """Decode a batch through pipeline.latent (explicit decoding = 0 latents, no start/end token)."""
    from pipeline.decoding import generate_with_latents
    from pipeline.latent import model_device

    k = decode.num_samples
    prompts = [p for p in prompts for _ in range(k)]
    gen = generate_with_latents(
        model, tokenizer, prompts, max_new_tokens=decode.max_new_tokens,
        do_sample=decode.do_sample, temperature=decode.temperature, top_p=decode.top_p,
        generator=batch_generator(seed, instances, model_device(model), k) if decode.do_sample else None,
        **latent_kw)
    return _group(gen.texts, gen.num_generated, k, latent_kw.get("num_latents", 0))


class ExplicitAdapter:
    """Any HF causal LM: left-padded batched greedy or sampled decoding, optional chat template."""

    default_num_latents = None

    def __init__(self, model, tokenizer, *, method: str = "cot", model_name: str = "model",
                 chat_template: bool = False, system: str | None = None, instruction: str | None = None,
                 decode: DecodeConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.decode = _prepare(tokenizer, decode or DecodeConfig())
        self.method, self.model_name = method, model_name
        self.chat_template, self.system, self.instruction = chat_template, system, instruction

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str = "fp32", device: str = "cpu",
                        attn: str = "auto", **kw) -> "ExplicitAdapter":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype],
            attn_implementation=resolve_attn(attn, device)).to(device).eval()
        return cls(model, tok, model_name=kw.pop("model_name", name_or_path), **kw)

    def format_prompt(self, inst: Instance) -> str:
        if not self.chat_template:
            return prompt_for(inst) if not self.instruction else f"{prompt_for(inst)}{self.instruction}\n"
        user = inst.question.strip() + (f"\n{self.instruction}" if self.instruction else "")
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = self.tokenizer.bos_token
        # The template writes BOS itself; the tokenizer would add a second one.
        if bos and text.startswith(bos) and self.tokenizer("x").input_ids[:1] == [self.tokenizer.bos_token_id]:
            text = text[len(bos):]
        return text

    def generate(self, instances, seed, num_latents=None):
        prompts = [self.format_prompt(inst) for inst in instances]
        return _decode(self.model, self.tokenizer, self.decode, prompts, instances, seed,
                       num_latents=0, start_token=None, end_token=None)

    def describe(self) -> dict:
        return {"adapter": "explicit", "model": self.model_name, "method": self.method,
                "chat_template": self.chat_template, "system": self.system, "instruction": self.instruction,
                **vars(self.decode)}


def _method_label(meta: dict) -> str:
    """latent_meta.json → published-table method key ("codi", "coconut+simcot", …)."""
    method = meta.get("method", "latent")
    if method == "simcot":
        return f"{meta.get('base_method', 'codi')}+simcot"
    return method


class LatentAdapter:
    """An exported Coconut / CODI / SIM-CoT model: ``question\\n<bot>`` · n latents · ``<eot>`` · decode."""

    def __init__(self, model, tokenizer, *, num_latents: int | None, start_token: str | None, end_token: str | None,
                 projection=None, method: str = "codi", model_name: str = "model", step_decoder=None,
                 decode: DecodeConfig | None = None, meta: dict | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.decode = _prepare(tokenizer, decode or DecodeConfig(max_new_tokens=64))
        self.default_num_latents = num_latents
        self.start_token, self.end_token, self.projection = start_token, end_token, projection
        self.method, self.model_name, self.step_decoder = method, model_name, step_decoder
        self.meta = meta or {}

    @classmethod
    def from_exported(cls, path: str | Path, *, dtype: str = "fp32", device: str = "cpu", attn: str = "auto",
                      decode: DecodeConfig | None = None, model_name: str | None = None) -> "LatentAdapter":
        from pipeline.export import load_exported

        ex = load_exported(str(path), dtype=dtype, device=device)
        _set_attn(ex.model, resolve_attn(attn, device))
        meta = ex.meta
        explicit = meta.get("method") in ("cot", "nocot")     # same format, no latents to sweep
        return cls(ex.model, ex.tokenizer, num_latents=None if explicit else int(meta.get("num_latents", 0)),
                   start_token=meta.get("start_token"), end_token=meta.get("end_token"),
                   projection=ex.projection, method=_method_label(meta),
                   model_name=model_name or meta.get("base_model") or str(path),
                   step_decoder=getattr(ex, "step_decoder", None), decode=decode, meta={**meta, "path": str(path)})

    def generate(self, instances, seed, num_latents=None):
        n = (self.default_num_latents or 0) if num_latents is None else num_latents
        return _decode(self.model, self.tokenizer, self.decode, [prompt_for(inst) for inst in instances],
                       instances, seed, num_latents=n, start_token=self.start_token, end_token=self.end_token,
                       projection=self.projection)

    def rollout(self, instances, num_latents: int | None = None):
        """The raw :class:`pipeline.decoding.LatentGeneration` (greedy) — for the latent report."""
        from pipeline.decoding import generate_with_latents

        n = (self.default_num_latents or 0) if num_latents is None else num_latents
        return generate_with_latents(self.model, self.tokenizer, [prompt_for(i) for i in instances],
                                     num_latents=n, start_token=self.start_token, end_token=self.end_token,
                                     projection=self.projection, max_new_tokens=self.decode.max_new_tokens)

    def describe(self) -> dict:
        return {"adapter": "latent", "model": self.model_name, "method": self.method,
                "num_latents": self.default_num_latents, "start_token": self.start_token,
                "end_token": self.end_token, "meta": self.meta, **vars(self.decode)}
