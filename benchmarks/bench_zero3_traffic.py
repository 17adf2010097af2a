"""ZeRO-3 parameter traffic: all-gathered bytes per training step of CoT-SFT, CODI and SIM-CoT.

    OMP_NUM_THREADS=1 python benchmarks/bench_zero3_traffic.py            # minutes (2 ranks, 12 runs)
    OMP_NUM_THREADS=1 python benchmarks/bench_zero3_traffic.py --json     # the summary as JSON on stdout
    python -c "import bench_zero3_traffic as b; print(b.measure(hidden=64, layers=2))"   # from benchmarks/run.py

What is measured: 2 CPU ranks (torchrun, gloo) train real steps through the project's Strategy and
methods (`pipeline.train.build_module` → `Strategy.prepare` → `forward/backward/step`) on a random
tiny LLaMA (h256, L4 by default, the fixture tokenizer) with LoRA, for each method and each
DeepSpeed setting below. `pipeline.strategy.count_all_gathers` counts the bytes of every
all-gather that goes through deepspeed.comm (ZeRO-3's parameter fetches, ZeRO-2's post-step weight
gathers). The first `--warmup` steps are not counted (DeepSpeed records its module trace in step 1
and uses it, for prefetch and reuse, from step 2); the next `--steps` are, and the figure is bytes
per optimizer step on one rank (both ranks gather the same).

Settings (the shipped ds_configs templates; ZeRO-3 windows scaled to the model, see below):
  zero3           ds_configs/zero3.json: the memory-lean ZeRO-3 template
  zero3_resident  ds_configs/zero3_resident.json: zero3's windows + keep_params_gathered, which holds
                  the weights of every part called more than once per step (the latent rollout's)
  zero2           ds_configs/zero2.json: parameters replicated; only updated weights are gathered

Scaling to "8B-like" settings. The ZeRO-3 thresholds are parameter counts, so at a tiny model the
template's values (prefetch 5e7, live 1e9, reuse distance 1e9 elements) would cover the whole
model many times over and every parameter would simply stay resident: nothing like 8B, where one
pass over LLaMA-3.1-8B walks 8.03e9 elements, so a 1e9 reuse window releases a layer long before
the next latent pass needs it again. Each threshold is therefore multiplied by
    scale = (parameters of the tiny base model) / 8,030,261,248    (LLaMA-3.1-8B)
so that every window covers the same *fraction* of the model as at 8B (the reuse window: 1/8 of a
pass). The persistence threshold is scaled the same way; at 8B it keeps only the norm
vectors whole, at this scale nothing, a difference of < 0.5 % of the bytes. LoRA's rank is
scaled with the hidden size (r 128 at 4096 → 8 at 256) so the adapters are the same ~4 % of the
model as in the 8B recipes.

Reported per setting and method: bytes/step, model equivalents (bytes / the main model's bytes),
and two ratios: vs CoT-SFT under the same setting, and vs CoT-SFT under zero3 (the baseline of
issue 12). `--json` prints the summary dict (also written to --out); `measure(...)` returns it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLAMA_8B_PARAMS = 8_030_261_248
# DeepSpeed's defaults, in effect where a template leaves a threshold out.
DS_DEFAULTS = {"stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
               "stage3_max_reuse_distance": 1_000_000_000, "stage3_param_persistence_threshold": 100_000}
SETTINGS = ("zero3", "zero3_resident", "zero2")
METHODS = {
    "cot": ["method.name=cot"],
    "codi": ["method.name=codi"],
    "simcot_full": ["method.name=simcot", "method.simcot.decoder=full"],
    "simcot_shared": ["method.name=simcot", "method.simcot.decoder=shared"],
}
BASELINE = "zero3"


# --------------------------------------------------------------------------- scaling
def scaled_template(name: str, scale: float) -> dict:
    """ds_configs/<name>.json with its ZeRO-3 thresholds multiplied by `scale` (at least 1)."""
    template = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    zero = template["zero_optimization"]
    if zero.get("stage") == 3:
        for key, default in DS_DEFAULTS.items():
            zero[key] = max(1, round(float(zero.get(key, default)) * scale))
    return template


def lora_rank(hidden: int) -> int:
    return max(1, round(128 * hidden / 4096))


# --------------------------------------------------------------------------- the launcher
def measure(*, hidden: int = 256, layers: int = 4, batch: int = 4, latents: int = 6, steps: int = 2,
            warmup: int = 2, settings=SETTINGS, methods=tuple(METHODS), seed: int = 0,
            timeout: int = 3600, log=None) -> dict:
    """Run the 2-rank measurement and return the summary dict (see `summarise`)."""
    spec = {"hidden": hidden, "layers": layers, "batch": batch, "latents": latents, "steps": steps,
            "warmup": warmup, "settings": list(settings), "methods": list(methods), "seed": seed}
    with tempfile.TemporaryDirectory(prefix="zero3_traffic_") as tmp:
        spec["out"] = str(Path(tmp) / "raw.json")
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).resolve()), "--worker", str(spec_file)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise RuntimeError(f"bench_zero3_traffic: timed out after {timeout}s\n{output[-3000:]}") from None
        if log is not None:
            log(output)
        if proc.returncode != 0:
            failed = Path(tempfile.gettempdir()) / f"bench_zero3_traffic_{os.getpid()}.log"
            failed.write_text(output)
            raise RuntimeError(f"bench_zero3_traffic: ranks failed (exit {proc.returncode}); "
                               f"whole output in {failed}\n{output[-4000:]}")
        raw = json.loads(Path(spec["out"]).read_text())
    return summarise(raw)


def summarise(raw: dict) -> dict:
    """Ratios vs CoT-SFT (same setting, and the zero3 baseline) added to the per-rank figures."""
    results = raw["results"]
    for per_method in results.values():
        cot = per_method.get("cot")
        base = results.get(BASELINE, {}).get("cot")
        for r in per_method.values():
            if cot:
                r["ratio_vs_cot_same_setting"] = r["bytes_per_step"] / cot["bytes_per_step"]
            if base:
                r["ratio_vs_cot_zero3"] = r["bytes_per_step"] / base["bytes_per_step"]
    target = results.get("zero3_resident", {}).get("simcot_full", {}).get("ratio_vs_cot_same_setting")
    return {"benchmark": "bench_zero3_traffic", **raw, "target": {
        "what": "SIM-CoT (full decoder) all-gathered bytes per step <= 2x CoT-SFT's, both under the chosen ZeRO-3 "
                "settings (zero3_resident) at 8B-like thresholds",
        "ratio": target, "met": target is not None and target <= 2.0}}


# --------------------------------------------------------------------------- the ranks
def _worker(spec_file: str) -> None:
    import torch

    import common  # noqa: F401  (sys.path, threads)
    from pipeline.config import load_config
    from pipeline.methods import StepContext
    from pipeline.models import add_latent_tokens, meta_model
    from pipeline.strategy import Strategy, agree_max, count_all_gathers, get_rank, init_distributed, print0
    from pipeline.train import build_module

    spec = json.loads(Path(spec_file).read_text())
    rank, world = init_distributed(timeout_s=300)
    tokenizer = common.fixture_tokenizer()
    add_latent_tokens(tokenizer)               # what load_model does: count the model it will build
    examples = common.train_examples(spec["batch"] * world, spec["seed"])[rank::world]
    size = [f"model.tiny.hidden_size={spec['hidden']}", f"model.tiny.num_layers={spec['layers']}",
            "model.tiny.num_heads=4", f"model.tiny.intermediate_size={2 * spec['hidden']}"]
    base_params = sum(p.numel() for p in meta_model(load_config(None, size).model, len(tokenizer)).parameters())
    scale = base_params / LLAMA_8B_PARAMS
    tmp = Path(spec["out"]).parent
    out = {"args": {k: v for k, v in spec.items() if k != "out"}, "world_size": world,
           "base_params": base_params, "scale": scale, "lora_r": lora_rank(spec["hidden"]),
           "thresholds": {}, "results": {}}
    total = spec["warmup"] + spec["steps"]
    for setting in spec["settings"]:
        template = scaled_template(setting, scale)
        out["thresholds"][setting] = {k: v for k, v in template["zero_optimization"].items() if k in DS_DEFAULTS}
        path = tmp / f"{setting}.json"
        path.write_text(json.dumps(template))
        for method in spec["methods"]:
            overrides = size + METHODS[method] + [
                "model.lora.enabled=true", f"model.lora.r={lora_rank(spec['hidden'])}", "model.lora.alpha=32",
                "model.lora.dropout=0", f"method.num_latents={spec['latents']}", "deepspeed.enabled=true",
                f"deepspeed.template={path}", f"train.per_device_train_batch_size={spec['batch']}",
                f"train.max_steps={total}", "train.warmup_ratio=0", f"train.output_dir={tmp / 'run'}"]
            cfg = load_config(None, overrides)
            module, collate, loaded = build_module(cfg, tokenizer)
            main_bytes = sum(p.numel() * p.element_size() for p in module.parts["lm"].parameters())
            # What one gather of each part's weights brings: DeepSpeed pads every partition to W equal pieces.
            parts = {name: sum(-(-p.numel() // world) * world * p.element_size() for p in part.parameters())
                     for name, part in module.parts.items()}
            strategy = Strategy(cfg)
            strategy.prepare(module, total, hidden_size=loaded.hidden_size)
            batch = collate(examples)
            per_step, phases, seconds = [], [], []
            with count_all_gathers() as counter:
                for _ in range(total):
                    counter.reset()
                    t0 = time.perf_counter()
                    loss, _ = strategy.forward(batch, StepContext(agree_max=agree_max))
                    after_forward = counter.bytes
                    strategy.backward(loss)
                    after_backward = counter.bytes
                    strategy.step()
                    seconds.append(time.perf_counter() - t0)
                    per_step.append(counter.bytes)
                    phases.append([after_forward, after_backward - after_forward, counter.bytes - after_backward])
            measured = per_step[spec["warmup"]:]
            if len(set(measured)) != 1:
                print0(f"note: {setting}/{method} gathered different bytes per step: {measured}")
            bytes_per_step = sum(measured) / len(measured)
            forward, backward, optimizer = (sum(p[i] for p in phases[spec["warmup"]:]) / len(measured) for i in range(3))
            out["results"].setdefault(setting, {})[method] = {
                "bytes_per_step": bytes_per_step, "bytes_each_step": per_step,
                "forward_bytes": forward, "backward_bytes": backward, "optimizer_step_bytes": optimizer,
                "main_model_bytes": main_bytes, "model_equivalents": bytes_per_step / main_bytes,
                "part_gather_bytes": parts,
                "step_seconds": seconds, "loss": float(loss.detach())}
            print0(f"{setting:>15} {method:>14}: {bytes_per_step / 2**20:9.2f} MiB/step "
                   f"({bytes_per_step / main_bytes:.2f} model equivalents)")
            strategy.engine.destroy()
            del strategy, module
            if get_rank() == 0:          # after every variant: a failed run still leaves what it measured
                Path(spec["out"]).write_text(json.dumps(out))
            torch.distributed.barrier()


# --------------------------------------------------------------------------- the table
def format_table(summary: dict) -> str:
    a = summary["args"]
    lines = [f"ZeRO-3 all-gathered bytes per optimizer step, one rank of {summary['world_size']} (gloo, CPU); tiny "
             f"LLaMA h{a['hidden']} L{a['layers']} ({summary['base_params']:,} base parameters, scale "
             f"{summary['scale']:.3g} of LLaMA-3.1-8B), LoRA r{summary['lora_r']}, micro batch {a['batch']}, "
             f"{a['latents']} latents, {a['steps']} counted steps after {a['warmup']} warm-up",
             "", "| setting | method | MiB / step | forward / backward / optimizer step (model equivalents) | main-model equivalents "
                 "| vs CoT-SFT (same setting) | vs CoT-SFT (zero3) |", "|---|---|---:|---:|---:|---:|---:|"]
    for setting, per_method in summary["results"].items():
        for method, r in per_method.items():
            same = r.get("ratio_vs_cot_same_setting")
            base = r.get("ratio_vs_cot_zero3")
            split = " / ".join(f"{r[k] / r['main_model_bytes']:.2f}" for k in
                               ("forward_bytes", "backward_bytes", "optimizer_step_bytes"))
            lines.append(f"| {setting} | {method} | {r['bytes_per_step'] / 2**20:.2f} | {split} | "
                         f"{r['model_equivalents']:.2f} | "
                         f"{'-' if same is None else f'{same:.2f}x'} | {'-' if base is None else f'{base:.2f}x'} |")
    lines += ["", "thresholds (elements) after scaling: " + "; ".join(
        f"{s}: " + ", ".join(f"{k.replace('stage3_', '')} {v:,}" for k, v in t.items()) if t else f"{s}: -"
        for s, t in summary["thresholds"].items())]
    t = summary["target"]
    if t["ratio"] is not None:
        lines.append(f"target: {t['what']}: {t['ratio']:.2f}x -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="micro batch per rank")
    p.add_argument("--latents", type=int, default=6)
    p.add_argument("--steps", type=int, default=2, help="counted steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=3600, help="seconds before the ranks are killed")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "bench_zero3_traffic.json"))
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    t0 = time.time()
    summary = measure(hidden=args.hidden, layers=args.layers, batch=args.batch, latents=args.latents,
                      steps=args.steps, warmup=args.warmup, settings=args.settings.split(","),
                      methods=args.methods.split(","), seed=args.seed, timeout=args.timeout)
    summary["wall_seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2) if args.json else format_table(summary) + f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
