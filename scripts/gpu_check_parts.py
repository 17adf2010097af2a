"""The parts of scripts/gpu_check.py: the model set-up, the attention, training and NCCL checks.

Each check returns a dict with "status" (passed / failed / skipped) and its figures; `guarded`
turns an exception into a failed status with the error, so one broken part never hides the others.
"""
from __future__ import annotations

import gc
import os
import socket
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ONE_B = "meta-llama/Llama-3.2-1B-Instruct"      # the planner reads recipes/model_configs/<name>/config.json
ATTN_TOLERANCE = 2e-2                           # relative L2 error, bf16 (8 mantissa bits, summed over layers)


def guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:                      # noqa: BLE001 -- reported, never swallowed silently
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


@dataclass
class Setup:
    smoke: bool
    device: torch.device
    config: object                  # transformers LlamaConfig
    tokenizer: object
    examples: list
    batch: int
    attn: str                       # what training uses: flash_attention_2 when installed on CUDA, else sdpa

    @classmethod
    def create(cls, smoke: bool, batch: int) -> "Setup":
        from transformers import AutoConfig, AutoTokenizer

        from pipeline.data import read_gsm8k_aug
        from pipeline.models import add_latent_tokens, resolve_attn_implementation, tiny_model_config
        from pipeline.tokenizer_build import FIXTURES_DIR

        device = torch.device("cpu") if smoke else torch.device("cuda", 0)
        if smoke:
            config = tiny_model_config("tiny-llama", cls.tiny(), cls.tiny().vocab_size)
        else:       # Llama-3.2-1B's shape (vocab 128,256, tied embeddings), random init: no download
            config = AutoConfig.from_pretrained(str(ROOT / "recipes" / "model_configs" / Path(ONE_B).name))
        tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "tests" / "fixtures" / "eval" / "tokenizer"))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        add_latent_tokens(tokenizer)         # ids < 410: valid rows of the larger vocabulary, no resize
        examples = [e for e in read_gsm8k_aug(FIXTURES_DIR / "gsm8k_aug_train.txt").examples if e.answer.isdigit()]
        return cls(smoke, device, config, tokenizer, examples, batch, resolve_attn_implementation("auto", device))

    @staticmethod
    def tiny():
        from pipeline.config import TinyModelConfig
        return TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=512)

    def describe(self) -> dict:
        c = self.config
        return {"shape": "tiny LLaMA (smoke)" if self.smoke else f"{ONE_B} shape, random init",
                "hidden": c.hidden_size, "layers": c.num_hidden_layers, "vocab": c.vocab_size,
                "tied_embeddings": bool(c.tie_word_embeddings), "attn_implementation": self.attn,
                "micro_batch": self.batch}

    def model(self, attn: str):
        """bf16 random-init causal LM on the device (initialised there: fast at 1B)."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(self.config, dtype=torch.bfloat16, attn_implementation=attn)
        tok = self.tokenizer
        for target in (model.config, model.generation_config):
            target.pad_token_id, target.eos_token_id = tok.pad_token_id, tok.eos_token_id
        return model

    def cfg(self, method: str):
        from pipeline.config import Config, LoraConfig, ModelConfig

        cfg = Config()
        name = "tiny-llama" if self.smoke else ONE_B
        cfg.model = ModelConfig(name_or_path=name, tiny=self.tiny(), dtype="bf16", attn_implementation=self.attn,
                                lora=LoraConfig(enabled=True, r=8 if self.smoke else 128, alpha=32, dropout=0.1))
        cfg.method.name = method
        cfg.method.num_latents = 6
        cfg.method.simcot.decoder = "full"          # the paper's decoder: the most expensive kind
        cfg.data.max_tokens = 200                   # the LLaMA recipes' filter (the planner's sequence length)
        cfg.train.per_device_train_batch_size = self.batch
        cfg.deepspeed.enabled, cfg.deepspeed.template, cfg.deepspeed.world_size = True, "zero2", 1
        return cfg


# --------------------------------------------------------------------------- 1. attention
@torch.no_grad()
def attention_check(setup: Setup) -> dict:
    """flash_attention_2 vs sdpa (eager vs sdpa in a smoke run) on the latent rollout."""
    import importlib.util

    from pipeline.latent import embed, forward_step, left_pad, right_pad, rollout_latents

    if setup.smoke:
        impls = ("eager", "sdpa")
    elif importlib.util.find_spec("flash_attn") is None:
        return {"status": "skipped", "reason": "flash-attn is not installed (sdpa is used)"}
    else:
        impls = ("flash_attention_2", "sdpa")
    model = setup.model(impls[1]).eval()
    g = torch.Generator().manual_seed(0)
    lengths, n = ([37, 5, 120, 64, 12, 90] if not setup.smoke else [9, 3, 14]), 6
    prompts = [torch.randint(10, 400, (k,), generator=g).tolist() for k in lengths]
    ids, mask = left_pad(prompts, setup.tokenizer.pad_token_id)
    active = torch.ones(len(lengths), n, dtype=torch.long)
    for row in range(len(lengths)):                  # rows using fewer latents: masked latent columns
        active[row, n - row % 3:] = 0
    suffix, suffix_mask = right_pad([torch.randint(10, 400, (1 + k % 4,), generator=g).tolist() for k in lengths],
                                    setup.tokenizer.pad_token_id)
    dev = setup.device
    outputs = {}
    for impl in impls:
        model.set_attn_implementation(impl)
        _, state = forward_step(model, embed(model, ids.to(dev)), mask.to(dev), None)
        prefill_last = state.last_hidden
        latents, state, _ = rollout_latents(model, state, n, active=active.to(dev))
        out, _ = forward_step(model, embed(model, suffix.to(dev)), suffix_mask.to(dev), state)
        real = suffix_mask.bool().to(dev)
        outputs[impl] = {"prefill_last_hidden": prefill_last, "latents": latents,
                         "suffix_hidden": out.hidden_states[-1][real], "suffix_logits": out.logits[real]}
    errors = {}
    for key, want in outputs[impls[1]].items():
        got = outputs[impls[0]][key].float()
        errors[key] = float((got - want.float()).norm() / want.float().norm().clamp_min(1e-12))
    agree = float((outputs[impls[0]]["suffix_logits"].argmax(-1) == outputs[impls[1]]["suffix_logits"].argmax(-1))
                  .float().mean())
    worst = max(errors.values())
    del model
    _free()
    return {"status": "passed" if worst <= ATTN_TOLERANCE else "failed", "compared": f"{impls[0]} vs {impls[1]}",
            "rel_err": errors, "max_rel_err": worst, "tolerance": ATTN_TOLERANCE, "suffix_argmax_agreement": agree,
            "prompt_lengths": lengths, "latents": n, "active_latents_per_row": active.sum(-1).tolist()}


# --------------------------------------------------------------------------- 2. training steps
def train_steps(setup: Setup, method: str, steps: int, warmup: int, peak_tflops, memory_gb) -> dict:
    """`warmup` + `steps` optimizer steps of `method` through build_method + Strategy (DeepSpeed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.methods import StepContext, build_method
    from pipeline.models import LATENT_TOKENS, LoadedModel, apply_lora
    from pipeline.plan import make_plan
    from pipeline.strategy import Strategy
    from pipeline.train import count_tokens

    cfg = setup.cfg(method)
    tok = setup.tokenizer
    _free()
    # What earlier methods left allocated (DeepSpeed may keep some alive) is not this method's memory.
    baseline = torch.cuda.memory_allocated() / 2 ** 30 if not setup.smoke else None
    model = setup.model(setup.attn)
    token_ids = {k: tok.convert_tokens_to_ids(t) for k, t in LATENT_TOKENS.items()}
    model = apply_lora(model, cfg.model, new_token_ids=sorted(token_ids.values()))
    loaded = LoadedModel(model=model, tokenizer=tok, token_ids=token_ids, hidden_size=setup.config.hidden_size)
    module, collate = build_method(cfg, loaded)
    strategy = Strategy(cfg)
    strategy.prepare(module, total_steps=warmup + steps + 1, hidden_size=setup.config.hidden_size)
    b, pool = setup.batch, setup.examples
    batches = [collate([pool[(i * b + j) % len(pool)] for j in range(b)], 0) for i in range(warmup + steps)]
    ctx = StepContext()
    _reset_peak(setup)
    times = []
    for i, batch in enumerate(batches):
        _sync(setup)
        start = time.perf_counter()
        loss, _ = strategy.forward(batch, ctx)
        strategy.backward(loss)
        strategy.step()
        _sync(setup)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    with FlopCounterMode(display=False) as counter:      # forward + backward of one more step, not timed
        loss, _ = strategy.forward(batches[-1], ctx)
        strategy.backward(loss)
    strategy.engine.zero_grad()
    flops = counter.get_total_flops()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 - baseline if not setup.smoke else None
    plan = make_plan(cfg, gpu_memory_gb=memory_gb or 80.0)
    predicted = (plan.states["zero2"]["gpu"] + plan.activations["total"]) / 2 ** 30
    step_s = statistics.median(times)
    tokens = statistics.mean(count_tokens(bt) for bt in batches[warmup:])
    result = {"status": "passed" if torch.isfinite(loss).item() else "failed", "step_s": step_s,
              "step_times_s": times, "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
              "tflop_per_step": flops / 1e12, "achieved_tflops": flops / 1e12 / step_s,
              "mfu": (flops / 1e12 / step_s / peak_tflops) if peak_tflops else None,
              "peak_memory_gb": peak, "allocated_before_gb": baseline, "planner_predicted_gb": predicted,
              "planner_states_gb": plan.states["zero2"]["gpu"] / 2 ** 30,
              "planner_activations_gb": plan.activations["total"] / 2 ** 30,
              "measured_over_predicted": (peak / predicted) if peak is not None else None,
              "loss": float(loss.detach().float()), "zero_stage": strategy.zero_stage,
              "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
              "flops_note": "counted by torch FlopCounterMode (matmuls, sdpa); flash-attn's own kernels are not counted"}
    del strategy, module, loaded, model, batches
    _free()
    return result


# --------------------------------------------------------------------------- 3. NCCL
def nccl_check(smoke: bool, gpus: int, megabytes: int = 256, timeout_s: float = 120.0) -> dict:
    """All-reduce of a float32 tensor on every GPU (gloo on 2 CPU processes in a smoke run)."""
    import tempfile

    import torch.multiprocessing as mp

    backend, world = ("gloo", 2) if smoke else ("nccl", max(1, gpus))
    numel = (1 if smoke else megabytes) * 2 ** 20 // 4
    with tempfile.TemporaryDirectory(prefix="gpu_check_nccl_") as tmp:
        ctx = mp.start_processes(_allreduce_worker, args=(world, _free_port(), backend, numel, tmp),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.perf_counter() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.perf_counter() > deadline:      # never hang: a stuck collective is a failure
                for p in ctx.processes:
                    p.kill()
                return {"status": "failed", "backend": backend, "world_size": world,
                        "error": f"all-reduce did not finish within {timeout_s:.0f} s"}
        rows = [float(x) for x in (Path(tmp) / "rank0.txt").read_text().split()]
    ok, seconds = bool(rows[0]), rows[1]
    size = numel * 4
    return {"status": "passed" if ok else "failed", "backend": backend, "world_size": world, "bytes": size,
            "seconds": seconds, "bus_gb_per_s": 2 * (world - 1) / world * size / seconds / 1e9 if world > 1 else None,
            "value_check": ok}


def _allreduce_worker(rank: int, world: int, port: int, backend: str, numel: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    x = torch.full((numel,), float(rank + 1), device=device)
    dist.all_reduce(x)                                       # warm-up (and communicator set-up)
    x.fill_(float(rank + 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    expected = world * (world + 1) / 2
    ok = bool(torch.all(x == expected))
    if rank == 0:
        (Path(out_dir) / "rank0.txt").write_text(f"{int(ok)} {seconds}")
    dist.destroy_process_group()


# --------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(setup: Setup) -> None:
    if setup.device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(setup: Setup) -> None:
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
