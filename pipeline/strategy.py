"""Every DeepSpeed call of the project, and the rank helpers methods use (OpenRLHF's DeepspeedStrategy).

    init_distributed()                  # torchrun / deepspeed launcher / plain python (world size 1)
    ds_config = build_ds_config(cfg, world_size)
    strategy = Strategy(cfg)
    strategy.prepare(method_module, total_steps)       # AdamW + schedule + one deepspeed.initialize
    loss, parts = strategy.forward(batch, StepContext(agree_max=agree_max, counts=..., ...))
    strategy.backward_share(loss); strategy.step()

Training always goes through DeepSpeed: `deepspeed.enabled: false` means the ZeRO-0 template on
however many ranks were launched (world size 1 without a launcher), so there is one loop, one
optimizer path and one checkpoint format. Method code never imports this module's deepspeed; it
receives `agree_max` through its StepContext.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
from datetime import timedelta
from functools import partial

import torch
from torch import nn

from pipeline.checkpoint_files import CheckpointError
from pipeline.config import Config, ConfigError, resolve_ds_template

# DeepSpeed picks its accelerator at import time; on a machine without CUDA say so explicitly
# rather than relying on its auto-detection (which also probes for other accelerators).
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402


# --------------------------------------------------------------------------- ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def init_distributed(timeout_s: int = 1800) -> tuple[int, int]:
    """Start (or join) the process group; returns (rank, world size). Idempotent.

    Works under torchrun and the deepspeed launcher (they set RANK/WORLD_SIZE/MASTER_*); a plain
    `python` run becomes world size 1 on a free local port, because without these variables
    DeepSpeed goes looking for mpi4py. NCCL on GPUs, gloo on CPU.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if on_cpu():
            # init_distributed builds a shared-memory comm op on CPU (74-103 s cold) that training
            # never uses. Patch the module object itself: `import deepspeed.comm.torch as m` would
            # bind the *torch* package and silently patch nothing (docs: DEEPSPEED_ON_CPU.md).
            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
            # The deepspeed launcher does not set OMP_NUM_THREADS; oversubscribed ranks run 10-30x slower.
            if "OMP_NUM_THREADS" not in os.environ:
                local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        else:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl",
                                   timeout=timedelta(seconds=timeout_s), verbose=False)
    return dist.get_rank(), dist.get_world_size()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only. Never put a collective behind `if rank == 0`: use this instead."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def _device() -> torch.device:
    return torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())


def agree_max(value: int) -> int:
    """All ranks agree on the max of a data-dependent count (identity in a single process).

    Every rank must call this the same number of times; loops of `agree_max(n)` iterations then
    run the same forwards everywhere, which ZeRO-3 requires (a mismatch crashes or hangs).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_mean(values: list[float]) -> list[float]:
    """Mean of each value over ranks (logging). Every rank passes a list of the same length."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum of each value over ranks (float64: integer counts stay exact). Every rank passes a list
    of the same length."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- ds_config

def _find_auto(node, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


def _fill(ds: dict, key: str, value, source: str) -> None:
    """Fill an "auto" (or absent) entry; a concrete template value must agree with the config."""
    current = ds.get(key, "auto")
    if current != "auto" and current != value:
        raise ConfigError(f"deepspeed.template: {key} is {current} in the template but {source} gives {value}; "
                          f"set it to \"auto\" in the template or change {source}")
    ds[key] = value


# A template's own top-level key (removed before DeepSpeed sees the config). "repeatedly_called_parts":
# under ZeRO-3 the weights of every part a micro step calls more than once (the latent rollout's
# model: ~10 calls per step) are gathered once and held until the optimizer step, instead of being
# gathered again for each call and again in backward (docs/ZERO3.md). "never" (the default) leaves
# releasing to DeepSpeed's reuse window.
KEEP_GATHERED_KEY = "keep_params_gathered"
KEEP_GATHERED_VALUES = ("never", "repeatedly_called_parts")


def _keep_gathered(ds: dict, template) -> bool:
    """Validate and remove the template's keep_params_gathered key; True when it applies (ZeRO-3)."""
    value = ds.pop(KEEP_GATHERED_KEY, "never")
    if value not in KEEP_GATHERED_VALUES:
        raise ConfigError(f"deepspeed.template: {template}: {KEEP_GATHERED_KEY} is {value!r}; "
                          f"choose one of {', '.join(KEEP_GATHERED_VALUES)}")
    zero = ds.get("zero_optimization", {})
    keep = value == "repeatedly_called_parts" and zero.get("stage", 0) == 3
    if keep and zero.get("offload_param", {}).get("device", "none") != "none":
        raise ConfigError(f"deepspeed.template: {template}: {KEEP_GATHERED_KEY} keeps whole parameters on the "
                          "device, which contradicts offload_param; use one or the other")
    return keep


def keeps_params_gathered(cfg: Config) -> bool:
    """Whether the configured template holds repeatedly called parts gathered (ZeRO-3 only)."""
    if not cfg.deepspeed.enabled:
        return False
    template = resolve_ds_template(cfg.deepspeed.template)
    ds = json.loads(template.read_text())
    if cfg.deepspeed.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    return _keep_gathered(ds, template)


def hpz_partition_size(world_size: int, gpus_per_node: int | None = None) -> int:
    """ZeRO++ hpZ secondary partition size for "auto": the GPUs of one node, 1 on a single node."""
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return per_node if 1 < per_node < world_size and world_size % per_node == 0 else 1


def build_ds_config(cfg: Config, world_size: int, hidden_size: int | None = None) -> dict:
    """The final ds_config: the template with every "auto" DeepSpeed cannot resolve filled in.

    Batch: micro = train.per_device_train_batch_size, accumulation =
    train.gradient_accumulation_steps, train_batch_size = micro x accumulation x world size (and
    deepspeed.train_batch_size, when set, must equal it). Clipping = train.max_grad_norm,
    precision = model.dtype (bf16 keeps fp32 master weights in DeepSpeed's optimizer wrappers).
    ZeRO bucket sizes left "auto" are derived from `hidden_size` as transformers does;
    `zero_hpz_partition_size: "auto"` (ZeRO++ hpZ) becomes the GPUs per node (1 on one node).
    The template's own `keep_params_gathered` key is checked and removed (`keeps_params_gathered`).
    """
    ds_cfg, train = cfg.deepspeed, cfg.train
    template = resolve_ds_template(ds_cfg.template if ds_cfg.enabled else "zero0")
    ds = json.loads(template.read_text())
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"deepspeed.template: {template} has an '{section}' section; the engine builds "
                              f"AdamW and the schedule from train.* (remove the section)")
    micro, accum = train.per_device_train_batch_size, train.gradient_accumulation_steps
    global_batch = micro * accum * world_size
    if ds_cfg.train_batch_size is not None and ds_cfg.train_batch_size != global_batch:
        raise ConfigError(f"deepspeed.train_batch_size: {ds_cfg.train_batch_size} must equal "
                          f"per_device_train_batch_size ({micro}) x gradient_accumulation_steps ({accum}) "
                          f"x world size ({world_size}) = {global_batch}")
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train.per_device_train_batch_size")
    _fill(ds, "gradient_accumulation_steps", accum, "train.gradient_accumulation_steps")
    _fill(ds, "train_batch_size", global_batch,
          f"train.per_device_train_batch_size x train.gradient_accumulation_steps x world size {world_size}")
    _fill(ds, "gradient_clipping", train.max_grad_norm, "train.max_grad_norm")
    bf16 = cfg.model.dtype == "bf16"
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", bf16, "model.dtype")
    if "fp16" in ds:
        _fill(ds["fp16"], "enabled", False, "model.dtype (fp16 is not supported; use bf16)")

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if ds_cfg.enabled and ds_cfg.zero_stage is not None:
        zero["stage"] = ds_cfg.zero_stage
    _keep_gathered(ds, template)
    if zero.get("zero_hpz_partition_size") == "auto":
        zero["zero_hpz_partition_size"] = hpz_partition_size(world_size)
    if hidden_size is not None:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == "auto":
                zero[key] = value
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # We hand DeepSpeed a torch AdamW instance (no CPU-Adam compile, per-group learning rates);
        # with optimizer offload DeepSpeed refuses a client optimizer unless told this is intended.
        ds["zero_force_ds_cpu_optimizer"] = False
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"deepspeed.template: {template} leaves {', '.join(left)} as \"auto\", which neither the "
                          "config nor DeepSpeed resolves; give concrete values")
    return ds


# --------------------------------------------------------------------------- optimizer pieces

def param_group_name(name: str) -> str:
    """`decoder`, `projection` or `main`, by the MethodModule parameter name `parts.<part>.…`.

    A part whose name starts with `decoder` (the SIM-CoT step decoder and its input projection)
    or a LoRA adapter whose name contains `decoder` (the shared-weights decoder's "step_decoder"
    adapter: `…lora_A.step_decoder.weight`) trains at train.decoder_learning_rate; the `projection`
    part at train.projection_learning_rate.
    """
    pieces = name.split(".")
    part = pieces[1] if len(pieces) > 1 and pieces[0] == "parts" else pieces[0]
    if part.startswith("decoder") or any(prev.startswith("lora_") and "decoder" in p
                                          for prev, p in zip(pieces, pieces[1:])):
        return "decoder"
    if part == "projection":
        return "projection"
    return "main"


def param_groups(module: nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups: (main | decoder | projection) x (decay | no decay); frozen params left out.

    Biases and norm weights (1-D tensors) get no weight decay, as in transformers' Trainer.
    """
    train = cfg.train
    lrs = {"main": train.learning_rate,
           "decoder": train.decoder_learning_rate or train.learning_rate,
           "projection": train.projection_learning_rate or train.learning_rate}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        kind, decay = param_group_name(name), p.ndim >= 2
        group = groups.setdefault((kind, decay), {
            "params": [], "lr": lrs[kind], "weight_decay": train.weight_decay if decay else 0.0,
            "name": f"{kind}{'' if decay else '_no_decay'}"})
        group["params"].append(p)
    if not groups:
        raise ValueError("the method module has no trainable parameters")
    return list(groups.values())


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Multiplier of each group's learning rate at optimizer step `step` (transformers' schedules)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def warmup_steps(cfg: Config, total_steps: int) -> int:
    return math.ceil(cfg.train.warmup_ratio * total_steps)


# --------------------------------------------------------------------------- the strategy

class _HeldWeights:
    """keep_params_gathered: the weights of every part that a micro step calls more than once (the
    latent rollout's model) are gathered at their first use and held until the optimizer step.

    DeepSpeed's parameter coordinator gathers a parameter when a submodule needs it and, after that
    submodule's forward or backward, releases it unless `param.ds_active_sub_modules` (the set of
    submodules still using it) is non-empty. One more entry in that set for each partitioned weight
    of a held part keeps its first gather alive through every forward call, the backward and the
    further micro steps of the accumulation: the coordinator's fetches, prefetches and releases run
    unchanged and find the weights already there. Parts are chosen by counting their forward calls
    in the previous micro step (the same on every rank, as every rank runs the same forwards), so the
    first micro step holds nothing. The optimizer step releases everything before it updates the
    partitions (stage3 `_partition_all_parameters` clears these sets); `release` does it explicitly.
    """

    USER = "pipeline.strategy.keep_params_gathered"     # a pseudo submodule id

    def __init__(self, module: nn.Module):
        parts = getattr(module, "parts", None) or {"module": module}
        # Persistent (small) parameters are never released anyway.
        self.weights = {name: [p for p in part.parameters() if hasattr(p, "ds_id") and not p.ds_persist]
                        for name, part in parts.items()}
        self.calls: dict[str, int] = {}
        self.held: list[nn.Parameter] = []
        for name, part in parts.items():
            part.register_forward_pre_hook(partial(self._count, name))

    def _count(self, name: str, *_) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def hold_repeated(self) -> None:
        """Before a micro step: hold the weights of the parts the last micro step called twice or more."""
        for name, n in self.calls.items():
            if n > 1:
                for p in self.weights[name]:
                    if self.USER not in p.ds_active_sub_modules:
                        p.ds_active_sub_modules.add(self.USER)
                        self.held.append(p)
        self.calls = {}

    def release(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        free = []
        for p in self.held:
            p.ds_active_sub_modules.discard(self.USER)
            if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules:
                free.append(p)
        if free:
            free[0].partition(param_list=free)
        self.held = []


class Strategy:
    """One deepspeed.initialize around the whole MethodModule, plus the calls the loop needs."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world_size = init_distributed()
        self.engine = None
        self._own_norm: float | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self.ds_config: dict = {}
        self._held: _HeldWeights | None = None          # keep_params_gathered (ZeRO-3)

    @property
    def device(self) -> torch.device:
        return _device()

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def prepare(self, module: nn.Module, total_steps: int, hidden_size: int | None = None):
        """AdamW (fp32 state; per-part learning rates), warm-up + decay schedule, deepspeed.initialize.

        Frozen parts (a teacher target, a frozen base) live in the same module so ZeRO-3 partitions
        them too; they are simply not in the optimizer.
        """
        self.ds_config = build_ds_config(self.cfg, self.world_size, hidden_size)
        print0("ds_config: " + json.dumps(self.ds_config, sort_keys=True))
        # A torch AdamW instance: DeepSpeed compiles nothing (its CPU Adam takes ~135 s to build).
        self.optimizer = torch.optim.AdamW(param_groups(module, self.cfg), lr=self.cfg.train.learning_rate,
                                           betas=(0.9, 0.999), eps=1e-8)
        factor = partial(lr_factor, warmup=warmup_steps(self.cfg, total_steps), total=total_steps,
                         kind=self.cfg.train.lr_scheduler_type)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer,
                                                    lr_scheduler=scheduler, config=self.ds_config)
        # DeepSpeed's checkpoint engine unpickles with weights_only=False; shadow its `load` on this
        # engine's instance only (every checkpoint engine class has the same load(path, map_location)).
        self.engine.checkpoint_engine.load = safe_torch_load
        if self.zero_stage == 3 and keeps_params_gathered(self.cfg):
            self._held = _HeldWeights(self.engine.module)
        return self.engine

    # ---- the step
    def to_device(self, batch):
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def forward(self, batch: dict, ctx):
        if self._held is not None:
            self._held.hold_repeated()
        return self.engine(self.to_device(batch), ctx)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def backward_share(self, loss: torch.Tensor) -> None:
        """Backward of this micro batch's *share* of the global-batch loss (the shares of all micro
        batches and ranks add up to it, see pipeline.losses.share). DeepSpeed would divide the loss
        by the accumulation steps and averages gradients over ranks; undo both, so the gradient is
        exactly that of the global loss."""
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> bool:
        """Optimizer step at accumulation boundaries (DeepSpeed counts micro steps); True if it stepped."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self._own_norm = None
        if boundary and self.zero_stage == 0 and not self.ds_config["bf16"]["enabled"]:
            # DeepSpeed's plain fp32 path clips but drops the norm; grads are all-reduced by now.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._own_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        self.engine.step()
        if boundary and self._held is not None:
            self._held.release()
        return boundary

    def grad_norm(self) -> float | None:
        """Global gradient norm (before clipping) of the last optimizer step."""
        norm = self.engine.get_global_grad_norm()
        norm = self._own_norm if norm is None else norm
        return None if norm is None else float(norm)

    def learning_rates(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def reset_optimizer(self) -> None:
        """Forget AdamW moments (Coconut stage change). The schedule continues.

        DeepSpeed's wrappers keep our AdamW instance (over their fp32 partitions) and torch
        initialises the state lazily, so clearing it restarts the moments on every rank.
        """
        self.optimizer.state.clear()

    # ---- checkpoints (tags, RNG, manifests and pruning are pipeline.checkpoint's job)
    def save_checkpoint(self, root: str, tag: str) -> None:
        # Frozen weights are rebuilt from model.name_or_path + seed on resume, so they are not saved
        # (a frozen 8B base would otherwise be written at every checkpoint). No client_state: the
        # loop's own state goes to JSON next to DeepSpeed's files (pipeline.checkpoint).
        self.engine.save_checkpoint(root, tag=tag, save_latest=False,
                                    exclude_frozen_parameters=self.has_frozen())

    def load_checkpoint(self, root: str, tag: str) -> None:
        """Model, optimizer and scheduler from root/tag; every file goes through safe_torch_load."""
        if self.engine.load_universal_checkpoint():
            # Universal checkpoints are read by DeepSpeed's optimizers with torch.load(weights_only=False).
            raise CheckpointFileError(f"{root}/{tag}", "deepspeed.template: checkpoint.load_universal is not "
                                      "supported (DeepSpeed reads those files with unrestricted pickle)")
        self.engine.load_checkpoint(root, tag=tag, load_module_strict=not self.has_frozen())

    def has_frozen(self) -> bool:
        return any(not p.requires_grad for p in self.engine.module.parameters())

    # ---- export helpers
    def full_state_dict(self) -> dict | None:
        """The whole module's state dict on CPU, on rank 0 (None elsewhere). Call on every rank."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}

    @contextlib.contextmanager
    def gathered(self, params):
        """Full (unpartitioned) parameters inside the block under ZeRO-3, read-only; every rank enters."""
        if self._held is not None:
            self._held.release()           # GatheredParameters refuses to free a parameter still held
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
                yield
        else:
            yield


class GatherCounter:
    """What `count_all_gathers` saw: gathered bytes and calls, in total and by process-group size."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.bytes_by_group_size: dict[int, int] = {}

    def add(self, nbytes: int, group_size: int) -> None:
        self.bytes += nbytes
        self.calls += 1
        self.bytes_by_group_size[group_size] = self.bytes_by_group_size.get(group_size, 0) + nbytes

    def reset(self) -> None:
        self.__init__()


# The comm backend's all-gather methods and the name of their (first) output argument; `group` is
# the third parameter of each. Spelled out: the methods are wrapped by decorators taking *args.
_ALL_GATHERS = {"all_gather": "tensor_list", "all_gather_into_tensor": "output_tensor",
                "all_gather_base": "output_tensor", "all_gather_coalesced": "output_tensors"}


def _gathered_bytes(out) -> int:
    """Bytes of the gathered (full) output of one all-gather call: a tensor or a list of them."""
    tensors = out if isinstance(out, (list, tuple)) else [out]
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def count_all_gathers():
    """Count every all-gather that goes through deepspeed.comm on this rank (a GatherCounter).

    ZeRO-3's parameter fetches (partitioned_param_coordinator → all_gather_coalesced →
    dist.allgather_fn), hpZ's secondary-partition gathers and ZeRO-1/2's post-step weight gathers
    all end in one of the four all-gather methods of the comm backend object `deepspeed.comm.comm.cdb`,
    so wrapping that object's methods sees them all, whatever the caller imported. The count is the
    size of the gathered tensor (what each rank holds afterwards); a rank receives (W-1)/W of it over
    the wire. `bytes_by_group_size` separates hpZ's intra-node gathers (group = GPUs per node).
    """
    from deepspeed.comm import comm as ds_comm

    backend = ds_comm.cdb
    if backend is None:
        raise RuntimeError("count_all_gathers: deepspeed.comm is not initialised (call init_distributed first)")
    counter = GatherCounter()
    wrapped = []
    for name, out_arg in _ALL_GATHERS.items():
        original = getattr(backend, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _out_arg=out_arg, **kwargs):
            out = kwargs[_out_arg] if _out_arg in kwargs else args[0]
            group = kwargs["group"] if "group" in kwargs else (args[2] if len(args) > 2 else None)
            counter.add(_gathered_bytes(out), dist.get_world_size(group))
            return _original(*args, **kwargs)

        setattr(backend, name, counted)      # an instance attribute shadows the class method
        wrapped.append(name)
    try:
        yield counter
    finally:
        for name in wrapped:
            delattr(backend, name)


def zero_checkpoint_state_dict(checkpoint_dir: str, tag: str) -> dict:
    """fp32 trainable weights from a checkpoint written by any ZeRO stage, read offline (no ranks)."""
    from pathlib import Path

    files = list((Path(checkpoint_dir) / tag).glob("*optim_states.pt"))
    if files and any("zero_pp_rank" in f.name or "bf16_zero" in f.name for f in files):
        with _zero_to_fp32_loads_safely() as zero_to_fp32:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag,
                                                                         exclude_frozen_parameters=True)
    states = safe_torch_load(Path(checkpoint_dir) / tag / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in states["module"].items()}


# --------------------------------------------------------------------------- loading DeepSpeed's files safely

class CheckpointFileError(CheckpointError):
    """A checkpoint file that was not loaded; the message starts with its path. `refused`: it holds
    pickled objects outside the allow-list (planted or foreign), rather than being damaged."""

    def __init__(self, path, message: str, refused: bool = False):
        super().__init__(f"{path}: {message}")
        self.path, self.refused = str(path), refused


def deepspeed_pickle_types() -> list:
    """Every non-tensor type DeepSpeed 0.19 pickles into its files (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-0/2/3, fp32/bf16 and offload
    checkpoints). None runs code when rebuilt: an int Enum looked up by value, a dataclass of two
    ints and a plain class whose attributes are set from the pickle (no __setstate__)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, fragment_address, LossScaler]


def safe_torch_load(path, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) with only DeepSpeed's types added. A refused or unreadable file
    raises CheckpointFileError naming it (not torch's advice to retry with weights_only=False)."""
    import pickle
    import re
    import zipfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointFileError(path, "missing")
    if not zipfile.is_zipfile(path):      # torch.save's format is a zip; anything else is damaged or foreign
        raise CheckpointFileError(path, "not a torch.save archive (truncated or damaged)")
    try:
        with torch.serialization.safe_globals(deepspeed_pickle_types()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(\. Please|$)", str(exc), re.M)
        raise CheckpointFileError(path, "refused: it holds pickled objects outside the allow-list of types "
                                  f"DeepSpeed writes ({found.group(1) if found else exc}); nothing in it was run",
                                  refused=True) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as exc:
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise CheckpointFileError(path, f"unreadable ({type(exc).__name__}: {first_line})") from None


def refused_globals(path) -> list[str]:
    """The types a torch.save file needs beyond the allow-list, read from its pickle opcodes without
    running them, so ranks can agree to refuse a checkpoint before any rank starts a collective load.
    It is an early warning (it reads only the GLOBAL opcodes); safe_torch_load stays the enforcement."""
    with torch.serialization.safe_globals(deepspeed_pickle_types()):
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))


class _TorchWithSafeLoad:
    """Stands in for `torch` inside deepspeed.utils.zero_to_fp32, which calls
    torch.load(weights_only=False) itself; every other attribute is the real torch's."""

    @staticmethod
    def load(f, map_location=None, mmap=False, **_ignored):    # its weights_only=False is dropped on purpose
        return safe_torch_load(f, map_location=map_location, mmap=mmap)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _zero_to_fp32_loads_safely():
    """deepspeed.utils.zero_to_fp32 with its module-global `torch` swapped for the block's duration."""
    from deepspeed.utils import zero_to_fp32

    saved = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad()
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = saved


def estimate_model_states(trainable: int, largest_layer: int, gpus_per_node: int, nodes: int) -> dict:
    """DeepSpeed's model-state estimators (bytes per GPU / per node's CPU) for `trainable` parameters.

    They assume mixed precision: 16-bit weights + 16-bit grads + fp32 master + two fp32 Adam moments
    (2 + 2 + 4 + 8 = 16 bytes per trainable parameter, plus buffers), ZeRO-3 with zero.Init.
    Keys: "zero2", "zero2_offload", "zero3", "zero3_offload_optim", "zero3_offload_all" →
    {"gpu": bytes, "cpu": bytes}.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    out = {}
    for name, offload in (("zero2", False), ("zero2_offload", True)):
        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, gpus_per_node, nodes, cpu_offload=offload)
        out[name] = {"gpu": gpu, "cpu": cpu}
    for name, optim, params in (("zero3", False, False), ("zero3_offload_optim", True, False),
                                ("zero3_offload_all", True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest_layer, gpus_per_node, nodes,
                                                            cpu_offload=optim, cpu_offload_params=params)
        out[name] = {"gpu": gpu, "cpu": cpu}
    return out
