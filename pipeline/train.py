"""Training entry point: config → data → method → DeepSpeed loop → checkpoints → export.

    latent-train                                         # embedded default: tiny LLaMA CoT-SFT on CPU
    latent-train --config recipes/configs/gpt2_coconut.yaml train.learning_rate=1e-4
    torchrun --nproc_per_node 2 -m pipeline.train --config … deepspeed.enabled=true deepspeed.template=zero3
    latent-train --plan --config recipes/configs/llama8b_simcot.yaml deepspeed.world_size=8
    latent-train --export-from runs/x/checkpoints/step_100 runs/x/export_100   # offline, no ranks

Every run goes through DeepSpeed (ZeRO-0 when `deepspeed.enabled` is false; world size 1 without a
launcher), so one loop serves a laptop and a cluster. Outputs in `train.output_dir`: config.yaml,
train_log.jsonl, metrics.json, checkpoints/, export/ and (tiny models) tokenizer/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

from pipeline._lazy import LazyModule
from pipeline.checkpoint_files import CheckpointError
from pipeline.config import Config, ConfigError, dump_config, load_config, on_codi
from pipeline.data.sources import DataError, read_section

# Imported on first use, so that main() rejects a bad config or data file before torch loads.
np = LazyModule("numpy")
torch = LazyModule("torch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latent-train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (defaults: the embedded tiny CoT-SFT run)")
    p.add_argument("--plan", action="store_true", help="print the memory plan and exit (loads no weights)")
    p.add_argument("--export-from", nargs=2, metavar=("CKPT_DIR", "OUT_DIR"),
                   help="export a checkpoint (output_dir/checkpoints/step_N) offline and exit")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="--plan: memory of one GPU")
    p.add_argument("--gpus-per-node", type=int, help="--plan: GPUs per node (default: min(world size, 8))")
    # The deepspeed launcher appends --local_rank unless told --no_local_rank; ranks come from the env.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-4")
    # intermixed: overrides may come before and after --config (`latent-train a=1 --config f b=2`)
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.export_from:
            from pipeline.export import export_from_checkpoint
            export_from_checkpoint(args.export_from[0], args.export_from[1], args.config, args.overrides)
            return 0
        cfg = load_config(args.config, args.overrides)   # fails here, before anything heavy loads
        if args.plan:
            from pipeline.plan import format_plan, make_plan
            print(format_plan(make_plan(cfg, args.config, args.gpu_memory_gb, args.gpus_per_node)))
            return 0
        # Every rank reads and checks the data now, before DeepSpeed and the tokenizer: a malformed
        # file fails here on every rank alike (exit 2). run() reuses what was read.
        read_section(cfg, "train")
        read_section(cfg, "eval")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:      # --export-from
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except CheckpointError as exc:      # every rank raises it alike (checkpoint.resume_tag agrees first)
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    return 0 if result["step"] >= result["total_steps"] or result["interrupted"] else 1


# --------------------------------------------------------------------------- setup helpers

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_run_tokenizer(cfg: Config, output_dir: str | Path):
    """The run's tokenizer; tiny models build one from the shipped fixtures into output_dir/tokenizer
    (rank 0 builds, the others wait and read it)."""
    from pipeline.models import load_tokenizer
    from pipeline.strategy import barrier, is_rank0
    from pipeline.tokenizer_build import default_tokenizer_texts

    build_dir = Path(output_dir) / "tokenizer"
    builds = cfg.model.name_or_path in ("tiny-llama", "tiny-gpt2") and not cfg.model.tokenizer
    if builds and is_rank0() and not (build_dir / "tokenizer.json").is_file():
        load_tokenizer(cfg.model, build_dir=build_dir, build_texts=default_tokenizer_texts())
    barrier()
    # After the barrier the built tokenizer is on disk: every rank just reads it.
    return load_tokenizer(cfg.model, build_dir=build_dir)


def load_examples(cfg: Config, tokenizer, log=print) -> list:
    """Every train source read, malformed records counted, filters applied and logged."""
    from pipeline.data import apply_filters
    from pipeline.data.lengths import trained_length
    from pipeline.data.sources import read_section, write_skipped
    from pipeline.strategy import is_rank0

    data = read_section(cfg, "train")           # already read (and cached) by main()
    for i, (path, n, skipped) in enumerate(data.per_source):
        log(f"data.train.{i}: {n} examples from {path}" + (f" ({skipped} malformed skipped)" if skipped else ""))
    if data.excluded:
        log(f"data.exclude_eval_questions: {data.excluded} train examples dropped (their questions are in data.eval)")
    examples = data.examples
    if cfg.data.on_malformed == "skip" and is_rank0():
        skipped = data.skipped + (read_section(cfg, "eval").skipped if cfg.data.eval else [])
        log(f"data: {len(skipped)} malformed records skipped, listed in "
            f"{write_skipped(cfg.train.output_dir, skipped)}")
    count_tokens = trained_length(cfg, tokenizer)   # the longest sequence the configured method trains

    kept, _ = apply_filters(examples, drop_last_step=cfg.data.drop_last_step,
                            require_digit_answer=cfg.data.require_digit_answer, max_tokens=cfg.data.max_tokens,
                            count_tokens=count_tokens if cfg.data.max_tokens else None, log=log)
    return kept


def build_module(cfg: Config, tokenizer):
    """(MethodModule, collate, LoadedModel), seeded so every rank and every rebuild is identical."""
    from pipeline.methods import build_method
    from pipeline.models import load_model

    set_seed(cfg.train.seed)
    loaded = load_model(cfg.model, tokenizer)
    module, collate = build_method(cfg, loaded)
    return module, collate, loaded


def uses_curriculum(cfg: Config) -> bool:
    return cfg.method.name == "coconut" or (cfg.method.name == "simcot" and cfg.method.simcot.base == "coconut")


def curriculum_stage(cfg: Config, epoch: int, step: int = 0) -> int:
    """Coconut stage at an epoch (or, with method.coconut.steps_per_stage, at an optimizer step);
    also SIM-CoT on Coconut; CODI's gradual stage (method.codi.gradual_steps_per_stage); else 0."""
    from pipeline.methods import method_module

    if uses_curriculum(cfg):
        return method_module("coconut").stage_at(epoch, step, cfg)
    return method_module("codi").stage_at(step, cfg) if on_codi(cfg) else 0


def resets_optimizer_for_epoch(cfg: Config, epoch: int) -> bool:
    """Whether AdamW's moments are forgotten as `epoch` starts: method.coconut.reset_optimizer=epoch
    (the reference code). `stage` (the paper) resets where the stage changes, which with
    method.coconut.steps_per_stage can be mid-epoch: the loop does that one."""
    return epoch > 0 and uses_curriculum(cfg) and cfg.method.coconut.reset_optimizer == "epoch"


def curriculum_warning(cfg: Config) -> str | None:
    """A run whose epochs stop before Coconut's last stage trains a model evaluation will misuse."""
    from pipeline.methods import method_module

    if not uses_curriculum(cfg) or cfg.train.max_steps or cfg.method.coconut.steps_per_stage:
        return None
    needed = method_module("coconut").curriculum_epochs(cfg)
    if cfg.train.num_train_epochs >= needed:
        return None
    return (f"warning: train.num_train_epochs={cfg.train.num_train_epochs} ends before Coconut's last stage "
            f"(stage {cfg.method.coconut.max_latent_stage} starts after {needed - cfg.method.coconut.epochs_per_stage} "
            f"epochs; the whole curriculum takes {needed})")


def count_tokens(batch: dict) -> int:
    """Real (unpadded) input tokens of a batch: the sum of its 2-D `*_mask` tensors."""
    return int(sum(v.sum() for k, v in batch.items()
                   if k.endswith("_mask") and isinstance(v, torch.Tensor) and v.dim() == 2))


def step_counts(cfg: Config, batches: list[dict]) -> dict[str, float] | None:
    """Targets of each loss part over one optimizer step: the method's `loss_counts` summed over
    the step's micro batches, then over all ranks (one all-reduce, on every rank, every step).

    Each micro batch's loss is then its sum over targets / these global counts, so a token weighs
    the same whatever micro batch or rank it lands in (as transformers' `num_items_in_batch`).
    None for a method without `loss_counts` (its loss stays a mean per micro batch)."""
    from pipeline.methods import method_module
    from pipeline.strategy import all_reduce_sum

    loss_counts = getattr(method_module(cfg.method.name), "loss_counts", None)
    if loss_counts is None:
        return None
    local = [loss_counts(batch, cfg) for batch in batches]
    names = sorted(local[0])
    return dict(zip(names, all_reduce_sum([sum(c[name] for c in local) for name in names])))


def schedule(cfg: Config, n_examples: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps). Incomplete micro batches and accumulation groups
    at an epoch's end are dropped, so every rank and every world size steps on full global batches."""
    train = cfg.train
    per_rank = math.ceil(n_examples / world)
    steps_per_epoch = per_rank // train.per_device_train_batch_size // train.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"train.per_device_train_batch_size: {n_examples} examples over {world} ranks give no "
                          f"full step of {train.per_device_train_batch_size} x "
                          f"{train.gradient_accumulation_steps} (accumulation) per rank; lower them")
    return steps_per_epoch, train.max_steps or steps_per_epoch * train.num_train_epochs


# --------------------------------------------------------------------------- logging

def memory_mb() -> float:
    """Peak CUDA memory allocated on GPU; current resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunLog:
    """Rank 0 only: tqdm bar, output_dir/train_log.jsonl, TensorBoard and wandb when requested."""

    def __init__(self, cfg: Config, out: Path, total: int, start_step: int):
        from pipeline.strategy import is_rank0

        self.active, self.last_loss = is_rank0(), None
        self.bar = self.tb = self.wandb = None
        if not self.active:
            return
        from tqdm.auto import tqdm

        path = out / "train_log.jsonl"
        if path.is_file():   # a resumed run redoes the steps after its checkpoint: drop their old lines
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = open(path, "a")
        self.bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True)
        if "tensorboard" in cfg.train.report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in cfg.train.report_to:
            try:
                import wandb
                self.wandb = wandb.init(project="latent-cot", dir=str(out), config=dataclasses.asdict(cfg))
            except ImportError:
                print("train.report_to: wandb is not installed; logging to JSONL/TensorBoard only", flush=True)

    def write(self, state, *, loss: float, parts: dict, lrs: dict, grad_norm, tokens_per_s: float,
              samples_per_s: float) -> None:
        self.last_loss = loss
        if not self.active:
            return
        record = {"step": state.step, "epoch": state.epoch, "stage": state.stage, "loss": loss,
                  **{f"loss/{k}": v for k, v in parts.items()}, **{f"lr/{k}": v for k, v in lrs.items()},
                  "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "samples_per_s": samples_per_s,
                  "memory_mb": memory_mb(), "samples": state.samples, "time": time.time()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{next(iter(lrs.values())):.2e}", tok_s=f"{tokens_per_s:.0f}")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, state.step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=state.step)

    def write_eval(self, state, metrics: dict, best: bool) -> None:
        """One validation record in train_log.jsonl (keys "eval/…"), and the bar's postfix."""
        if not self.active:
            return
        record = {"step": state.step, "epoch": state.epoch, "stage": state.stage,
                  **{f"eval/{k}": v for k, v in metrics.items()}, "eval/best": best, "time": time.time()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.bar.write(f"step {state.step}: validation accuracy {metrics['accuracy']:.1f}% "
                       f"(strict {metrics['accuracy_strict']:.1f}%), loss {metrics['loss']:.4f}"
                       + (" (best so far)" if best else ""))
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"eval/{k}", v, state.step)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)

    def tick(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if not self.active:
            return
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# --------------------------------------------------------------------------- the run

def _validate_step(strategy, cfg: Config, tokenizer, valid, collate, ctx, stage: int, state, log) -> bool:
    """Validate on every rank, log on rank 0; True when this step is the new best (same on all ranks,
    since the metrics are summed over ranks)."""
    from pipeline.validation import improved, validate

    metrics = validate(strategy, cfg, tokenizer, valid, collate, ctx, stage)
    metrics.pop("predictions")
    key = cfg.train.metric_for_best_model
    better = improved(key, metrics[key], state.best_metric)
    if better:
        state.best_metric, state.best_step = metrics[key], state.step
    log.write_eval(state, metrics, better)
    return better


def run(cfg: Config, on_end=None) -> dict:
    """Train (resuming when a checkpoint exists), checkpoint, export; returns the run's summary.

    `on_end(strategy, tokenizer)`, when given, runs on every rank with the engine still live
    (tests compare the live model with its export there).
    """
    from pipeline import checkpoint
    from pipeline.data import epoch_shard
    from pipeline.methods import StepContext
    from pipeline.strategy import Strategy, agree_max, all_reduce_mean, barrier, print0

    strategy = Strategy(cfg)                     # joins / starts the process group
    rank, world = strategy.rank, strategy.world_size
    out = Path(cfg.train.output_dir)
    if rank == 0:
        print0(dump_config(cfg, out / "config.yaml"))
    barrier()
    # Before any model loads: a damaged or refused checkpoint stops the run here.
    resume_from = checkpoint.resume_tag(out, cfg.train.resume)
    tokenizer = load_run_tokenizer(cfg, out)
    examples = load_examples(cfg, tokenizer, log=print0)
    module, collate, loaded = build_module(cfg, tokenizer)
    steps_per_epoch, total = schedule(cfg, len(examples), world)
    strategy.prepare(module, total, hidden_size=loaded.hidden_size)
    state = checkpoint.load(strategy, out, resume_from) if resume_from else None
    resumed = state is not None
    state = state or checkpoint.TrainState()
    print0(f"{len(examples)} examples, world size {world}, {steps_per_epoch} steps/epoch, {total} steps"
           + (f"; resumed at step {state.step}" if resumed else ""))
    if curriculum_warning(cfg):
        print0(curriculum_warning(cfg))

    # SIGTERM (a scheduler's pre-emption) only sets a flag: the ranks agree on it at the next step
    # boundary, save together and exit 0. Handlers can only be installed from the main thread.
    stop = {"requested": False}
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True)) if in_main else None
    micro, accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    log = RunLog(cfg, out, total, start_step=state.step)
    valid = None
    if cfg.train.eval_steps:
        from pipeline.validation import load_validation_set
        valid = load_validation_set(cfg)
        print0(f"validation every {cfg.train.eval_steps} steps on {len(valid.instances)} data.eval examples "
               f"(best by {cfg.train.metric_for_best_model})")
    last_saved = state.step if resumed else -1
    window: list[list[float]] = []                # per micro step: [loss share, *part shares, tokens]
    pending: list[dict] = []                      # this optimizer step's micro batches not yet run
    part_names: list[str] | None = None
    interrupted = False
    t_window = time.time()
    while state.step < total and not interrupted:
        if state.micro_in_epoch == 0 and resets_optimizer_for_epoch(cfg, state.epoch):   # not on a mid-epoch resume
            strategy.reset_optimizer()
        order = epoch_shard(len(examples), cfg.train.seed, state.epoch, rank, world)
        usable = steps_per_epoch * accum
        for mb in range(state.micro_in_epoch, usable):
            if not pending:    # an optimizer step starts: the curriculum may move on (Coconut), then
                stage = curriculum_stage(cfg, state.epoch, state.step)   # collate its micro batches, count targets
                if stage != state.stage:
                    if uses_curriculum(cfg) and cfg.method.coconut.reset_optimizer == "stage":
                        strategy.reset_optimizer()
                    print0(f"epoch {state.epoch}, step {state.step}: curriculum stage {state.stage} -> {stage}")
                    state.stage = stage
                pending = [collate([examples[i] for i in order[k * micro:(k + 1) * micro]], stage)
                           for k in range(mb, min(mb + accum, usable))]
                counts = step_counts(cfg, pending)
            batch = pending.pop(0)
            ctx = StepContext(agree_max=agree_max, stage=stage, step=state.step, counts=counts)
            loss, parts = strategy.forward(batch, ctx)
            if counts is None:     # a micro-batch mean: its share is 1/(accum·world) of the step's loss
                loss, parts = loss / (accum * world), {k: v / (accum * world) for k, v in parts.items()}
            strategy.backward_share(loss)
            lrs = strategy.learning_rates()        # the rates this step uses (the schedule moves in step())
            stepped = strategy.step()
            part_names = part_names or sorted(parts)
            window.append([float(loss.detach())] + [float(parts[k]) for k in part_names] + [count_tokens(batch)])
            state.micro_in_epoch = mb + 1
            if not stepped:
                continue
            state.step += 1
            state.samples += micro * accum * world
            if state.step % cfg.train.logging_steps == 0 or state.step == total:
                # Collective on every rank; only rank 0 writes. Shares summed over a step's micro
                # batches and all ranks are the step's per-target means; averaged over the window's steps.
                elapsed = max(time.time() - t_window, 1e-9)
                steps_in_window = len(window) / accum
                sums = np.sum(window, axis=0)
                means = [v * world for v in all_reduce_mean((sums / steps_in_window).tolist())]
                log.write(state, loss=means[0], parts=dict(zip(part_names, means[1:-1])),
                          lrs=lrs, grad_norm=strategy.grad_norm(),
                          tokens_per_s=means[-1] * steps_in_window / elapsed,
                          samples_per_s=steps_in_window * micro * accum * world / elapsed)
                window, t_window = [], time.time()
            log.tick(state.step)
            save_now = cfg.train.save_steps and state.step % cfg.train.save_steps == 0
            new_best = False
            if valid is not None and (state.step % cfg.train.eval_steps == 0 or state.step == total):
                new_best = _validate_step(strategy, cfg, tokenizer, valid, collate, ctx, stage, state, log)
                save_now = save_now or new_best      # the best model must exist as a checkpoint
            if agree_max(int(stop["requested"])):
                print0(f"SIGTERM: saving at step {state.step} and exiting")
                save_now, interrupted = True, True
            if save_now:
                checkpoint.save(strategy, out, state, cfg.train.save_total_limit)
                last_saved = state.step
                if new_best and rank == 0:
                    checkpoint.mark_best(out, f"step_{state.step}")
            if state.step >= total or interrupted:
                break
        if state.micro_in_epoch >= usable:
            state.epoch, state.micro_in_epoch = state.epoch + 1, 0
    if in_main:
        signal.signal(signal.SIGTERM, previous)
    if last_saved != state.step:
        checkpoint.save(strategy, out, state, cfg.train.save_total_limit)
    best = checkpoint.agreed_best_tag(out) if cfg.train.eval_steps else None
    if cfg.train.load_best_model_at_end and best is not None and not interrupted:
        print0(f"loading the best checkpoint by validation {cfg.train.metric_for_best_model}: {best} "
               f"({state.best_metric:.4g})")
        checkpoint.load(strategy, out, tag=best)
    if cfg.train.export and not interrupted:
        from pipeline.export import export_live
        export_live(strategy, cfg, tokenizer, out / "export")
    if on_end is not None:
        on_end(strategy, tokenizer)
    result = {"step": state.step, "total_steps": total, "epoch": state.epoch, "stage": state.stage,
              "final_loss": log.last_loss, "interrupted": interrupted, "world_size": world,
              "zero_stage": strategy.zero_stage, "resumed": resumed,
              "best_checkpoint": best, "best_step": state.best_step,
              f"best_{cfg.train.metric_for_best_model}": state.best_metric,
              "exported": "best" if cfg.train.load_best_model_at_end and best else "last"}
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        from pipeline.curves import plot_train_log
        plot_train_log(out / "train_log.jsonl", out / "train_curves.png")
    log.close()
    barrier()
    return result


if __name__ == "__main__":
    sys.exit(main())
