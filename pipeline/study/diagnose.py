"""Why a latent model answers what it answers: measurements on an export, per latent and per token.

    python -m pipeline.study.diagnose --model runs/x/export --data DIR/test.txt [--n 200] [--out OUT]

For each of N problems (GSM8k-Aug lines, calculator steps), with the model's own latents (greedy,
the harness's generation):
  * step decoder (SIM-CoT exports): does latent k's decoded text equal step k exactly; does it hold
    step k's result (the number after "=") and its first operand;
  * LM head on the hidden state latent k was made from: is its top-1 token the first digit of
    step k's result, of step k's first operand (what the latent "would write");
  * attention: share of the attention mass that the positions predicting the answer put on the
    latent columns (vs question, <bot>/<eot> and answer-prefix columns), per layer, mean over heads;
  * answer CE split by token class with the gold answer teacher-forced: the "The answer is: " prefix,
    the answer's digits, EOS — which tokens the student's loss is made of;
  * accuracy, and the mean |prediction − gold| when wrong ("reads a rough magnitude").
Writes OUT/diagnosis.json and prints a Markdown summary.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

STEP_RE = re.compile(r"<<\s*(-?[\d.]+)\s*([-+*/])\s*(-?[\d.]+)\s*=\s*(-?[\d.]+)\s*>>")


def _step_parts(step: str) -> tuple[str, str, str] | None:
    m = STEP_RE.search(step or "")
    return (m.group(1), m.group(4), m.group(2) + m.group(3)) if m else None   # (operand, result, "op b")


def _first_digit_token(tokenizer, number: str) -> int:
    return tokenizer(number, add_special_tokens=False).input_ids[0]


@torch.no_grad()
def diagnose(export: str, data: str, n: int = 200, batch_size: int = 50) -> dict:
    from evaluation.answers import extract, is_correct
    from evaluation.benchmarks import load_benchmark
    from evaluation.latent_report import latents_per_step_of, step_references
    from pipeline.export import load_exported
    from pipeline.latent import ANSWER_PREFIX, generate_with_latents, question_prompt

    ex = load_exported(export)
    model, tok, meta = ex.model, ex.tokenizer, ex.meta
    model.set_attn_implementation("eager")                       # attention weights need the eager kernel
    insts = load_benchmark("gsm8k_aug", data, limit=n).instances
    n_lat = int(meta.get("num_latents") or 0)
    per_step = latents_per_step_of(meta)
    stats: dict[str, list] = {k: [] for k in ("correct", "abs_err", "dec_exact", "dec_result", "dec_operand",
                                              "head_result", "head_operand", "attn", "ce_prefix", "ce_digits",
                                              "ce_eos", "n_steps", "latent_norm", "dec_op")}
    emb_norm = float(model.get_input_embeddings().weight.norm(dim=-1).mean())
    for start in range(0, len(insts), batch_size):
        chunk = insts[start:start + batch_size]
        gen = generate_with_latents(model, tok, [question_prompt(i.question) for i in chunk], num_latents=n_lat,
                                    start_token=meta.get("start_token"), end_token=meta.get("end_token"),
                                    projection=ex.projection, max_new_tokens=24)
        decoded = (ex.step_decoder.decode_latents(gen.latents.reshape(-1, gen.latents.shape[-1]))
                   if ex.step_decoder is not None and n_lat else None)
        head_top = (model.get_output_embeddings()(gen.latent_hidden).argmax(-1) if n_lat else None)   # [B, n]
        if n_lat:
            stats["latent_norm"] += gen.latents.norm(dim=-1).mean(0).tolist()
        for b, inst in enumerate(chunk):
            pred = extract(gen.texts[b], inst)
            ok = is_correct(pred, inst)
            stats["correct"].append(int(ok))
            stats["n_steps"].append(len(inst.reference_steps))
            if not ok and pred is not None:
                stats["abs_err"].append(abs(float(pred) - float(inst.gold)))
            for k, step in enumerate(step_references(inst.reference_steps, n_lat, per_step)):
                parts = _step_parts(step)
                if parts is None:
                    continue
                operand, result, op_b = parts
                row = {"k": k}
                if decoded is not None:
                    text = decoded[b * n_lat + k]
                    got = _step_parts(text)
                    stats["dec_exact"].append((k, int(re.sub(r"\s", "", text) == re.sub(r"\s", "", step))))
                    stats["dec_result"].append((k, int(got is not None and got[1] == result)))
                    stats["dec_operand"].append((k, int(got is not None and got[0] == operand)))
                    stats["dec_op"].append((k, int(got is not None and got[2] == op_b)))
                top = int(head_top[b, k])
                stats["head_result"].append((k, int(top == _first_digit_token(tok, result))))
                stats["head_operand"].append((k, int(top == _first_digit_token(tok, operand))))
                del row
        _attention_and_ce(model, tok, chunk, gen, meta, ex.projection, stats, ANSWER_PREFIX)
    out = _summarise(stats, n_lat)
    out["embedding_row_norm_mean"] = emb_norm
    out["latent_input_norm_mean"] = statistics.fmean(stats["latent_norm"]) if stats["latent_norm"] else None
    return out


def _attention_and_ce(model, tok, chunk, gen, meta, projection, stats, prefix: str) -> None:
    """One teacher-forced forward per row: prompt ids, the generated latents, <eot>, gold answer."""
    from pipeline.latent import question_prompt

    emb = model.get_input_embeddings()
    for b, inst in enumerate(chunk):
        q = tok(question_prompt(inst.question)).input_ids
        start = [tok.convert_tokens_to_ids(meta["start_token"])] if meta.get("start_token") else []
        end = [tok.convert_tokens_to_ids(meta["end_token"])] if meta.get("end_token") else []
        pre = tok(prefix, add_special_tokens=False).input_ids
        ans = tok(prefix + inst.gold, add_special_tokens=False).input_ids[len(pre):] + [tok.eos_token_id]
        lat = gen.latents[b] if gen.latents.shape[1] else gen.latents[b][:0]
        pieces = [emb(torch.tensor(q + start)), lat.to(emb.weight.dtype), emb(torch.tensor(end + pre + ans))]
        x = torch.cat(pieces)[None]
        out = model(inputs_embeds=x, output_attentions=True, use_cache=False)
        t_q, t_l = len(q) + len(start), lat.shape[0]
        first_ans = t_q + t_l + len(end) + len(pre)                 # index of the first answer token
        logp = torch.log_softmax(out.logits[0].float(), -1)
        targets = (end + pre + ans)[1:] if end else (pre + ans)[1:]
        offset = t_q + t_l                                          # position of the first token after latents
        ce = [-float(logp[offset + i, t]) for i, t in enumerate(targets)]
        n_pre = len(pre) - (0 if end else 1)
        stats["ce_prefix"].append(statistics.fmean(ce[:n_pre]) if n_pre > 0 else 0.0)
        stats["ce_digits"].append(statistics.fmean(ce[n_pre:-1]))
        stats["ce_eos"].append(ce[-1])
        if t_l:
            # rows predicting the answer tokens: positions first_ans-1 … end-1
            rows = list(range(first_ans - 1, x.shape[1] - 1))
            per_layer = []
            for att in out.attentions:                              # [1, heads, T, T]
                a = att[0][:, rows].mean(0)                         # [rows, T], mean over heads
                per_layer.append(float(a[:, t_q:t_q + t_l].sum(-1).mean()))
            stats["attn"].append(per_layer)


def _by_k(pairs: list[tuple[int, int]], n: int) -> list[float | None]:
    out = []
    for k in range(n):
        vals = [v for kk, v in pairs if kk == k]
        out.append(100.0 * statistics.fmean(vals) if vals else None)
    return out


def _summarise(s: dict, n_lat: int) -> dict:
    attn = s["attn"]
    return {
        "n": len(s["correct"]), "accuracy": 100.0 * statistics.fmean(s["correct"]),
        "mean_abs_error_when_wrong": statistics.fmean(s["abs_err"]) if s["abs_err"] else None,
        "median_abs_error_when_wrong": statistics.median(s["abs_err"]) if s["abs_err"] else None,
        "step_decoder_exact_by_latent": _by_k(s["dec_exact"], n_lat) if s["dec_exact"] else None,
        "step_decoder_result_by_latent": _by_k(s["dec_result"], n_lat) if s["dec_result"] else None,
        "step_decoder_operand_by_latent": _by_k(s["dec_operand"], n_lat) if s["dec_operand"] else None,
        "step_decoder_operation_by_latent": _by_k(s["dec_op"], n_lat) if s["dec_op"] else None,
        "lm_head_top1_is_result_digit_by_latent": _by_k(s["head_result"], n_lat),
        "lm_head_top1_is_operand_digit_by_latent": _by_k(s["head_operand"], n_lat),
        "answer_attention_on_latents_by_layer": ([statistics.fmean(r[i] for r in attn) for i in range(len(attn[0]))]
                                                 if attn else None),
        "answer_ce": {"prefix": statistics.fmean(s["ce_prefix"]), "answer_digits": statistics.fmean(s["ce_digits"]),
                      "eos": statistics.fmean(s["ce_eos"])},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.study.diagnose", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="GSM8k-Aug lines (test or valid split)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out")
    a = p.parse_args(argv)
    result = diagnose(a.model, a.data, a.n)
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "diagnosis.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
