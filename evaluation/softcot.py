"""SoftCoT / SoftCoT++ evaluation: a frozen assistant writes soft thoughts, a projection maps them
into a frozen base model's embedding space, the base model decodes; answers are voted.

Per instance and per thought set ``s`` (SoftCoT++: one per trained initial token, or per
``initial_tokens`` string; SoftCoT: one):

1. assistant input ``[initial_token_s] + assistant_instruction + question + "\\n" + P×N`` (P = the
   assistant placeholder), one forward; with trained initial tokens (a pipeline.train SoftCoT++
   export) the ``N`` placeholder embeddings are set s's initial embedding instead, exactly as in
   training; the last-layer hidden states at the ``N`` placeholder positions → ``projection`` →
   ``N`` soft thoughts ``[N, d_base]``;
2. base input: the user message ``instruction + question + thoughts_prefix + begin + Q×N + end``
   (Q = the base placeholder; chat template optional), whose ``N`` placeholder embeddings are
   overwritten by the thoughts;
3. decoding (sampling by default, as in the paper) ``num_samples`` times; the runner scores the
   majority answer over all sets × samples (self-consistency).

All forwards are left-padded with explicit masks and position ids (:mod:`pipeline.latent`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from evaluation.adapters import DecodeConfig, Generation, batch_generator, resolve_attn

__all__ = ["SoftCoTAdapter", "load_projection"]


def load_projection(path: str | Path, dtype=torch.float32) -> torch.nn.Linear:
    """A ``Linear(d_assist → d_base)`` from safetensors keys ``[prefix.]weight`` / ``[prefix.]bias``."""
    from safetensors.torch import load_file

    tensors = {k.rsplit(".", 1)[-1]: v for k, v in load_file(str(path)).items()}
    if "weight" not in tensors:
        raise ValueError(f"{path}: no '*.weight' tensor for the SoftCoT projection")
    w = tensors["weight"]
    proj = torch.nn.Linear(w.shape[1], w.shape[0], bias="bias" in tensors)
    proj.load_state_dict({k: tensors[k] for k in ("weight", "bias") if k in tensors})
    return proj.to(dtype).eval()


def _pick(logits: torch.Tensor, decode: DecodeConfig, generator) -> torch.Tensor:
    """Greedy, or temperature/top-p sampling. logits [B, V] → ids [B]."""
    if not decode.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(decode.temperature, 1e-6), dim=-1)
    if decode.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < decode.top_p)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    from pipeline.latent import sample_rows

    return sample_rows(probs, generator)          # one generator per row: batch-invariant samples


class SoftCoTAdapter:
    """Assistant + projection + base; ``initial_tokens`` (one per set) turns on SoftCoT++."""

    method = "softcot"

    def __init__(self, assistant, assistant_tokenizer, base, base_tokenizer, projection, *,
                 num_thoughts: int = 4, assistant_placeholder: str | None = None,
                 base_placeholder: str | None = None, begin: str = "", end: str = "",
                 initial_tokens: list[str] | None = None, assistant_instruction: str = "",
                 instruction: str = "", chat_template: bool = True, model_name: str = "softcot",
                 decode: DecodeConfig | None = None, thoughts_prefix: str = "",
                 initial_embeddings: torch.Tensor | None = None) -> None:
        self.assistant, self.a_tok, self.base, self.b_tok = assistant, assistant_tokenizer, base, base_tokenizer
        self.projection = projection
        for tok in (self.a_tok, self.b_tok):
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
        self.default_num_latents = num_thoughts
        self.a_ph = assistant_placeholder or self.a_tok.pad_token
        self.b_ph = base_placeholder or self.b_tok.pad_token
        self.b_ph_id = self.b_tok.convert_tokens_to_ids(self.b_ph)
        self.begin, self.end = begin, end
        # SoftCoT++ sets: trained initial embeddings [S, d_assist] fill the placeholder slots (as in
        # training); else initial token strings are prepended to the assistant's text.
        self.initial_embeddings = initial_embeddings
        if initial_embeddings is not None and initial_tokens:
            raise ValueError("give trained initial_embeddings or initial_tokens strings, not both")
        self.initial_tokens = list(initial_tokens) if initial_tokens else [""]
        self.sets: list = list(initial_embeddings) if initial_embeddings is not None else self.initial_tokens
        self.assistant_instruction, self.instruction = assistant_instruction, instruction
        self.thoughts_prefix = thoughts_prefix
        self.chat_template = chat_template and getattr(self.b_tok, "chat_template", None) is not None
        self.model_name = model_name
        self.decode = decode or DecodeConfig(max_new_tokens=512, do_sample=True)
        if self.decode.num_samples > 1:
            self.decode.do_sample = True         # self-consistency needs different samples
        if len(self.sets) > 1:
            self.method = "softcot++"

    @classmethod
    def from_pretrained(cls, assistant: str, base: str, projection: str, *, dtype: str = "fp32",
                        device: str = "cpu", attn: str = "auto", **kw) -> "SoftCoTAdapter":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        td = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        load = lambda name: AutoModelForCausalLM.from_pretrained(  # noqa: E731
            name, dtype=td, attn_implementation=resolve_attn(attn, device)).to(device).eval()
        proj = load_projection(projection).to(device)     # fp32 master weights, as trained
        return cls(load(assistant), AutoTokenizer.from_pretrained(assistant), load(base),
                   AutoTokenizer.from_pretrained(base), proj,
                   model_name=kw.pop("model_name", base), **kw)

    @classmethod
    def from_exported(cls, path: str | Path, *, dtype: str = "fp32", device: str = "cpu", **kw) -> "SoftCoTAdapter":
        """A SoftCoT export of `pipeline.train` (assistant/ subdir, Linear projection, latent_meta.json),
        with the placeholder, delimiters, instructions and thought count it was trained with; `kw`
        (num_thoughts, decode, initial_tokens, ...) overrides them."""
        from pipeline.export import load_exported

        ex = load_exported(path, dtype=dtype, device=device)
        meta = ex.meta
        if meta.get("method") != "softcot" or ex.assistant is None:
            raise ValueError(f"{path}: not a SoftCoT export (latent_meta.json method {meta.get('method')!r}, "
                             f"assistant dir {meta.get('assistant_dir')!r})")
        kw.setdefault("model_name", str(path))
        for key, meta_key in (("num_thoughts", "num_thoughts"), ("assistant_placeholder", "placeholder"),
                              ("base_placeholder", "placeholder"), ("begin", "start_token"), ("end", "end_token"),
                              ("assistant_instruction", "assistant_instruction"), ("instruction", "instruction"),
                              ("chat_template", "chat_template"), ("thoughts_prefix", "thoughts_prefix")):
            if kw.get(key) is None and meta.get(meta_key) is not None:
                kw[key] = meta[meta_key]
        if meta.get("initial_tokens") == "trained" and not kw.get("initial_tokens"):
            from pipeline.export import _load_extras

            kw["initial_embeddings"] = _load_extras(Path(path), "initial_tokens")["weight"].float()
        return cls(ex.assistant, ex.assistant_tokenizer, ex.model, ex.tokenizer, ex.projection.float(), **kw)

    # ------------------------------------------------------------------ the three steps
    @torch.no_grad()
    def thoughts(self, questions: list[str], initial: str | torch.Tensor, n: int) -> torch.Tensor:
        """Soft thoughts [B, n, d_base] from one assistant forward; `initial` is a string prepended to
        the text, or a trained initial embedding [d_assist] that fills the placeholder slots."""
        from pipeline.latent import forward_step, left_pad, model_device, softcot_assistant_text
        from pipeline.methods.softcot_sets import fill_slots

        text_initial = initial if isinstance(initial, str) else ""
        texts = [softcot_assistant_text(q, n, self.a_ph, self.assistant_instruction, text_initial) for q in questions]
        ids = [self.a_tok(t).input_ids for t in texts]
        ph_id = self.a_tok.convert_tokens_to_ids(self.a_ph)
        if any(seq[-n:] != [ph_id] * n for seq in ids) and n:
            raise ValueError(f"assistant placeholder {self.a_ph!r} does not tokenize to one token")
        ids_t, mask = left_pad(ids, self.a_tok.pad_token_id)
        dev = model_device(self.assistant)
        embeds = self.assistant.get_input_embeddings()(ids_t.to(dev))
        if not isinstance(initial, str):
            embeds = fill_slots(embeds, initial.to(dev)[None], n, 1)
        out, _ = forward_step(self.assistant, embeds, mask.to(dev), None)
        hidden = out.hidden_states[-1][:, ids_t.shape[1] - n:] if n else out.hidden_states[-1][:, :0]
        proj_dtype = next(self.projection.parameters()).dtype
        return self.projection(hidden.to(proj_dtype))                      # [B, n, d_base]

    def base_prompt(self, question: str, n: int) -> str:
        from pipeline.latent import softcot_base_prompt

        return softcot_base_prompt(self.b_tok, question, n, self.b_ph, self.begin, self.end, self.instruction,
                                   self.chat_template, self.thoughts_prefix)

    @torch.no_grad()
    def decode_with_thoughts(self, questions: list[str], thoughts: torch.Tensor,
                             generator) -> tuple[list[str], list[int]]:
        """Base-model decoding with the thoughts spliced in; stops per row at EOS."""
        from pipeline.latent import forward_step, left_pad, model_device

        n = thoughts.shape[1]
        ids = [self.b_tok(self.base_prompt(q, n)).input_ids for q in questions]
        ids_t, mask = left_pad(ids, self.b_tok.pad_token_id)
        dev = model_device(self.base)
        ids_t, mask = ids_t.to(dev), mask.to(dev)
        emb = self.base.get_input_embeddings()(ids_t)                       # [B, T, d]
        slots = (ids_t == self.b_ph_id) & mask.bool()
        if n and not bool((slots.sum(-1) == n).all()):
            raise ValueError(f"base placeholder {self.b_ph!r} must appear exactly {n} times per prompt")
        if n:
            emb = emb.masked_scatter(slots[..., None], thoughts.to(emb.dtype).reshape(-1, emb.shape[-1]))
        out, state = forward_step(self.base, emb, mask, None)
        eos = self.b_tok.eos_token_id
        done = torch.zeros(len(questions), dtype=torch.bool, device=dev)
        generated: list[list[int]] = [[] for _ in questions]
        for _ in range(self.decode.max_new_tokens):
            nxt = _pick(out.logits[:, -1].float(), self.decode, generator)
            for i in range(len(questions)):
                if not done[i]:
                    generated[i].append(int(nxt[i]))
            done |= nxt == eos
            if bool(done.all()):
                break
            step = nxt[:, None]
            out, state = forward_step(self.base, self.base.get_input_embeddings()(step), torch.ones_like(step), state)
        texts = [self.b_tok.decode([t for t in g if t != eos], skip_special_tokens=True) for g in generated]
        return texts, [len(g) for g in generated]

    def generate(self, instances, seed, num_latents=None):
        n = self.default_num_latents if num_latents is None else num_latents
        k = max(1, self.decode.num_samples)
        from pipeline.latent import model_device

        questions = [inst.question for inst in instances]
        dev = model_device(self.base)
        per_inst: list[list[str]] = [[] for _ in instances]
        tokens = [0] * len(instances)
        for set_index, initial in enumerate(self.sets):
            # Fresh per-row streams per thought set: how many draws a row made in the previous set
            # depends on when the whole batch stopped.
            gen = batch_generator(seed, instances, dev, k, salt=f"set{set_index}") if self.decode.do_sample else None
            th = self.thoughts(questions, initial, n)                       # [B, n, d]
            rep_q = [q for q in questions for _ in range(k)]
            texts, counts = self.decode_with_thoughts(rep_q, th.repeat_interleave(k, dim=0), gen)
            for j, (t, c) in enumerate(zip(texts, counts)):
                per_inst[j // k].append(t)
                tokens[j // k] += c
        sets = len(self.sets)
        return [Generation(text=s[0], num_generated_tokens=tokens[i], num_latents=n * sets,
                           samples=s if len(s) > 1 else None) for i, s in enumerate(per_inst)]

    def describe(self) -> dict:
        return {"adapter": "softcot", "model": self.model_name, "method": self.method,
                "num_thoughts": self.default_num_latents,
                "initial_tokens": (f"trained ({len(self.sets)})" if self.initial_embeddings is not None
                                   else self.initial_tokens), "thoughts_prefix": self.thoughts_prefix,
                "assistant_placeholder": self.a_ph, "base_placeholder": self.b_ph, "begin": self.begin,
                "end": self.end, "chat_template": self.chat_template, **vars(self.decode)}
