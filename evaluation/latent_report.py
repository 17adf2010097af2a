"""What the latents say: for N examples, each latent decoded next to the reference steps.

Per latent ``k`` of an example:

- ``top_k``: the language-model head applied to the hidden state the latent was made from (the
  tokens the model would have written there), with probabilities;
- ``nearest``: the tokens whose input embeddings are closest (cosine) to the latent actually fed
  back (after the projection, for CODI / SIM-CoT);
- ``step_decoder``: the text the SIM-CoT step decoder generates from the latent, when the exported
  checkpoint has one;
- ``reference``: the benchmark's reference step (ProsQA / GSM8k-Aug steps) that latent ``k`` was
  trained to hold: step ``k``, or step ``k // c`` for a model trained with ``c`` latents per step
  (read from the export's ``latent_meta.json``; exports written before it recorded ``c`` need
  ``latents_per_step=``).

Written as ``latent_report.jsonl`` and ``latent_report.md``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from evaluation.answers import score
from evaluation.benchmarks import Instance

__all__ = ["latent_report", "write_latent_report", "decode_steps", "step_references", "latents_per_step_of"]


def _tok_str(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid])


def decode_steps(step_decoder, latents: torch.Tensor, tokenizer, max_new_tokens: int = 48) -> list[str] | None:
    """Texts from the step decoder for latents [N, d], or None when there is no usable decoder.

    Accepts a decoder with ``decode_latents(latents, max_new_tokens=…)`` (preferred) or
    ``generate_steps(…)``, or a plain callable, each returning ``list[str]``.
    """
    if step_decoder is None or latents.shape[0] == 0:
        return None
    for name in ("decode_latents", "generate_steps"):
        fn = getattr(step_decoder, name, None)
        if fn is not None:
            return list(fn(latents, max_new_tokens=max_new_tokens))
    if callable(step_decoder) and not isinstance(step_decoder, torch.nn.Module):
        return list(step_decoder(latents, max_new_tokens=max_new_tokens))
    return None


def latents_per_step_of(meta: dict) -> int:
    """c from an export's meta (SIM-CoT records it with its step decoder); 1 when absent."""
    return int((meta.get("step_decoder") or {}).get("latents_per_step", 1))


def step_references(steps: Sequence[str], num_latents: int, latents_per_step: int = 1) -> list[str | None]:
    """The reference step of each latent: step k // c, None past the reference steps. Unlike the
    training targets, no tail of extra steps is merged into the last latent's reference."""
    from pipeline.methods.step_decoder import align_steps    # lazy, like the harness's other pipeline imports

    return align_steps(list(steps)[:max(num_latents // latents_per_step, 1)], num_latents, latents_per_step)


@torch.no_grad()
def latent_report(adapter, instances: Sequence[Instance], *, top_k: int = 5, num_latents: int | None = None,
                  batch_size: int = 8, latents_per_step: int | None = None) -> list[dict]:
    """One record per instance: question, gold, prediction, and per latent its decodings."""
    per_step = latents_per_step or latents_per_step_of(getattr(adapter, "meta", {}))
    model, tok = adapter.model, adapter.tokenizer
    head, embed_w = model.get_output_embeddings(), model.get_input_embeddings().weight
    embed_n = torch.nn.functional.normalize(embed_w.float(), dim=-1)          # [V, d]
    records = []
    for start in range(0, len(instances), batch_size):
        chunk = list(instances[start:start + batch_size])
        gen = adapter.rollout(chunk, num_latents)
        hidden, latents = gen.latent_hidden, gen.latents                        # [B, n, d] each
        n = latents.shape[1]
        probs = torch.softmax(head(hidden.to(embed_w.dtype)).float(), dim=-1) if n else None   # [B, n, V]
        sims = (torch.nn.functional.normalize(latents.float(), dim=-1) @ embed_n.T) if n else None
        steps = decode_steps(adapter.step_decoder, latents.reshape(-1, latents.shape[-1]), tok)
        for b, inst in enumerate(chunk):
            s = score(gen.texts[b], inst)
            references = step_references(inst.reference_steps, n, per_step)
            rows = []
            for k in range(n):
                p, ids = probs[b, k].topk(min(top_k, probs.shape[-1]))
                c, nids = sims[b, k].topk(min(top_k, sims.shape[-1]))
                rows.append({
                    "latent": k,
                    "top_k": [[_tok_str(tok, int(i)), round(float(v), 4)] for v, i in zip(p, ids)],
                    "nearest": [[_tok_str(tok, int(i)), round(float(v), 4)] for v, i in zip(c, nids)],
                    "step_decoder": steps[b * n + k] if steps is not None else None,
                    "reference": references[k],
                })
            records.append({"id": inst.id, "question": inst.question, "gold": inst.gold,
                            "prediction": s["prediction_flexible"], "correct": s["correct_flexible"],
                            "raw": gen.texts[b], "reference_steps": list(inst.reference_steps),
                            "latents": rows})
    return records


def _cell(text) -> str:
    return "–" if text is None else str(text).replace("|", "\\|").replace("\n", "⏎")


def write_latent_report(records: list[dict], out: str | Path, title: str = "Latent report") -> dict[str, str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "latent_report.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    lines = [f"# {title}", ""]
    for r in records:
        lines += [f"## {r['id']}", "", f"**Question.** {_cell(r['question'])}", "",
                  f"**Gold** {_cell(r['gold'])} · **prediction** {_cell(r['prediction'])} "
                  f"({'correct' if r['correct'] else 'wrong'}) · **output** `{_cell(r['raw'])}`", ""]
        has_dec = any(x["step_decoder"] is not None for x in r["latents"])
        head = ("| latent | " + ("step decoder | " if has_dec else "")
                + "top-k (LM head) | nearest embeddings | reference step |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for x in r["latents"]:
            topk = ", ".join(f"`{_cell(t)!s}` {p:.3g}" for t, p in x["top_k"])
            near = ", ".join(f"`{_cell(t)!s}` {c:.2f}" for t, c in x["nearest"])
            dec = f"{_cell(x['step_decoder'])} | " if has_dec else ""
            lines.append(f"| {x['latent']} | {dec}{topk} | {near} | {_cell(x['reference'])} |")
        extra = r["reference_steps"][len(r["latents"]):]
        if extra:
            lines += ["", "Reference steps beyond the last latent: " + " · ".join(_cell(s) for s in extra)]
        lines.append("")
    (out / "latent_report.md").write_text("\n".join(lines), encoding="utf-8")
    return {"jsonl": str(out / "latent_report.jsonl"), "markdown": str(out / "latent_report.md")}
