"""Inference-ready Hugging Face directories (docs/DESIGN.md, "Exported checkpoint format").

    export_dir/
      config.json, model.safetensors, generation_config.json     plain transformers loads it
      tokenizer files (with the latent special tokens)
      adapter_config.json + adapter_model.safetensors            only with train.export_merge_lora=false
      latent_extra.safetensors                                   method weights, e.g. "projection.0.weight"
      latent_meta.json                                           method, latent count, tokens, projection spec
      step_decoder/                                              only with train.export_step_decoder=true
      assistant/                                                 SoftCoT: the frozen assistant + its tokenizer

From a live run (`export_live`, every rank calls it; ZeRO-3 weights are gathered 16-bit by
DeepSpeed) and offline from any checkpoint (`export_from_checkpoint`, one process, no ranks):

    python -m pipeline.export runs/x/checkpoints/step_100 runs/x/export_100 [--config cfg.yaml]

Both rebuild the method's parts on CPU with the run's builder, load the trained weights into them,
and write that, so the two paths produce the same directory. `load_exported` reads it back.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from pipeline.config import Config, load_config
from pipeline.latent import ANSWER_PREFIX
from pipeline.models import LATENT_TOKENS, torch_dtype

FORMAT_VERSION = 1
META_FILE, EXTRA_FILE, DECODER_DIR = "latent_meta.json", "latent_extra.safetensors", "step_decoder"


@dataclass
class Exported:
    model: nn.Module                 # transformers causal LM (a peft model when LoRA was kept as an adapter)
    tokenizer: object
    meta: dict
    projection: nn.Module | None     # CODI / SIM-CoT latent projection, fp32
    step_decoder: nn.Module | None   # `.decode_latents(latents [N, d]) -> list[str]`, when exported
    assistant: nn.Module | None = None      # SoftCoT: the frozen assistant LM
    assistant_tokenizer: object = None      # SoftCoT: its tokenizer


# --------------------------------------------------------------------------- metadata

def _latent_base(cfg: Config) -> str:
    return cfg.method.simcot.base if cfg.method.name == "simcot" else cfg.method.name


def latent_meta(cfg: Config, parts: nn.ModuleDict, lora: str | None, has_step_decoder: bool) -> dict:
    from pipeline.methods import coconut

    base = _latent_base(cfg)
    tokens = {"codi": ("bot", "eot"), "coconut": ("start_latent", "end_latent")}.get(base)
    num_latents = {"codi": cfg.method.num_latents, "coconut": coconut.inference_num_latents(cfg)}.get(base, 0)
    projection = None
    if "projection" in parts and cfg.method.name != "softcot":
        first = parts["projection"][0]      # codi.LatentProjection: Linear(d, d') → GELU → Linear → LayerNorm
        projection = {"kind": "codi_mlp", "hidden_size": first.in_features, "inner_size": first.out_features}
    meta = {"method": cfg.method.name, "num_latents": num_latents,
            "start_token": LATENT_TOKENS[tokens[0]] if tokens else None,
            "end_token": LATENT_TOKENS[tokens[1]] if tokens else None,
            "projection": projection, "answer_prefix": ANSWER_PREFIX, "has_step_decoder": has_step_decoder,
            "lora": lora, "base_model": cfg.model.name_or_path, "dtype": cfg.model.dtype,
            "format_version": FORMAT_VERSION}
    if cfg.method.name == "simcot":
        meta["base_method"] = base
        # Which reference step each latent was trained to decode (latents k·c … k·c+c−1 ↔ step k):
        # the latent report needs it to compare latent k with the right step.
        from pipeline.methods import step_decoder

        meta["step_decoder"] = ({"kind": cfg.method.simcot.decoder,
                                 "latents_per_step": step_decoder.latents_per_step(cfg)}
                                if has_step_decoder else None)
    if cfg.method.name == "softcot":
        from pipeline.methods import softcot
        meta.update(softcot.export_meta(cfg, parts))
    if base == "coconut":
        meta["coconut"] = {"c_thought": cfg.method.coconut.c_thought,
                           "max_latent_stage": cfg.method.coconut.max_latent_stage}
    return meta


# --------------------------------------------------------------------------- writing

def _save_step_decoder(parts: nn.ModuleDict, cfg: Config, tokenizer, out: Path) -> dict:
    """The decoder as a plain causal LM in out/step_decoder (+ "decoder_proj.*" extras).

    The shared decoder (a second LoRA adapter on the frozen base) is merged into a copy of the base,
    so it loads without peft and without the main adapter, exactly as it ran in training.
    """
    from pipeline.methods import step_decoder

    extras = {}
    if cfg.method.simcot.decoder == "main":       # the main model decodes: a plain copy of it
        model = copy.deepcopy(parts["lm"])
        model = model.merge_and_unload() if hasattr(model, "peft_config") else model
    elif cfg.method.simcot.decoder == "shared":
        model = copy.deepcopy(parts["lm"])
        # Only the decoder's adapter: merge_and_unload(adapter_names=[…]) would also try to merge
        # the main adapter's trainable latent-token rows under the decoder's name (peft KeyError).
        for name in [n for n in model.peft_config if n != step_decoder.ADAPTER_NAME]:
            model.delete_adapter(name)
        model = model.merge_and_unload()
    else:
        model = parts["decoder"]
        if "decoder_proj" in parts:
            extras = {f"decoder_proj.{k}": v for k, v in parts["decoder_proj"].state_dict().items()}
    model.to(torch_dtype(cfg.model.dtype)).save_pretrained(str(out / DECODER_DIR))
    step_decoder.decoder_tokenizer(cfg, SimpleNamespace(tokenizer=tokenizer)).save_pretrained(str(out / DECODER_DIR))
    return extras


def export_parts(parts: nn.ModuleDict, cfg: Config, tokenizer, out_dir: str | Path) -> Path:
    """Write an unpartitioned CPU copy of a method's parts as an export directory (consumes `parts`)."""
    from pipeline.methods import method_module

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = method_module(cfg.method.name)
    extras: dict[str, torch.Tensor] = {}
    with_decoder = cfg.train.export_step_decoder and cfg.method.name == "simcot"
    if with_decoder:
        extras.update(_save_step_decoder(parts, cfg, tokenizer, out))
    if hasattr(method, "inference_parts"):      # SIM-CoT: drop the training-only decoder
        parts = method.inference_parts(parts)
    if "assistant" in parts:                    # SoftCoT: the assistant goes to its own directory
        method.save_assistant(parts, cfg, tokenizer, out / method.ASSISTANT_DIR)
        parts = nn.ModuleDict({k: v for k, v in parts.items() if k != "assistant"})
    lm, lora = parts["lm"], None
    if hasattr(lm, "peft_config"):
        if cfg.train.export_merge_lora:
            lm, lora = lm.merge_and_unload(), "merged"
        else:
            lm.save_pretrained(str(out))          # adapter_config.json + adapter_model.safetensors
            lm, lora = lm.unload(), "adapter"     # the base weights, LoRA layers removed unmerged
    lm.to(torch_dtype(cfg.model.dtype))
    lm.config.pad_token_id = tokenizer.pad_token_id
    if lm.generation_config is not None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
        lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    for name, module in parts.items():
        if name != "lm":
            extras.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    if extras:
        from safetensors.torch import save_file
        save_file({k: v.detach().float().contiguous() for k, v in extras.items()}, str(out / EXTRA_FILE))
    meta = latent_meta(cfg, parts, lora, with_decoder)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


@contextlib.contextmanager
def _rng_preserved():
    """Rebuilding a module re-seeds the generators; the run (and other ranks) must not notice."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def _rebuilt_parts(cfg: Config, tokenizer, state: dict, *, trained_only: bool) -> nn.ModuleDict:
    """The method's parts rebuilt on CPU (same builder and seed as training), weights from `state`."""
    from pipeline.train import build_module

    with _rng_preserved():
        module, _, _ = build_module(cfg, tokenizer)
    missing, unexpected = module.load_state_dict(state, strict=False)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    buffers = {n for n, _ in module.named_buffers()}
    bad = [k for k in missing if not (trained_only and k in frozen) and k not in buffers]
    if bad or unexpected:
        raise ValueError(f"checkpoint does not match the rebuilt module: missing {bad[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    return module.parts


def export_live(strategy, cfg: Config, tokenizer, out_dir: str | Path) -> Path | None:
    """Export from a running engine. Every rank must call it (ZeRO-3 gathers are collective)."""
    from pipeline.strategy import barrier

    state = strategy.full_state_dict()      # 16-bit-gathered under ZeRO-3; on rank 0 only
    out = None
    if state is not None:
        out = export_parts(_rebuilt_parts(cfg, tokenizer, state, trained_only=False), cfg, tokenizer, out_dir)
        print(f"exported to {out}", flush=True)
    barrier()
    return out


def _verify_checkpoint(ckpt: Path) -> None:
    """Refuse a damaged checkpoint (or one holding a planted pickle) by name before reading it.
    One without a manifest (written before manifests existed, or copied by hand) is read anyway:
    every file still goes through strategy.safe_torch_load."""
    from pipeline import checkpoint_files

    if not ckpt.is_dir():
        raise checkpoint_files.CheckpointError(f"{ckpt}: not a checkpoint directory")
    if not (ckpt / checkpoint_files.MANIFEST).is_file():
        print(f"warning: {ckpt} has no {checkpoint_files.MANIFEST}; its files are not verified", file=sys.stderr)
        return
    problems = checkpoint_files.verify(ckpt)
    if problems:
        raise checkpoint_files.CheckpointError("; ".join(message for _, message in problems))


def export_from_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, config: str | None = None,
                           overrides=()) -> Path:
    """Offline export of `output_dir/checkpoints/step_N` (any ZeRO stage); the run's config.yaml by default."""
    from pipeline.models import load_tokenizer
    from pipeline.strategy import zero_checkpoint_state_dict

    ckpt = Path(ckpt_dir).resolve()
    _verify_checkpoint(ckpt)
    run_dir = ckpt.parent.parent
    cfg = load_config(config or run_dir / "config.yaml", list(overrides))
    tokenizer = load_tokenizer(cfg.model, build_dir=run_dir / "tokenizer")
    state = zero_checkpoint_state_dict(str(ckpt.parent), ckpt.name)
    parts = _rebuilt_parts(cfg, tokenizer, state, trained_only=True)
    return export_parts(parts, cfg, tokenizer, out_dir)


# --------------------------------------------------------------------------- reading

class ExportedStepDecoder(nn.Module):
    """The exported SIM-CoT decoder: `decode_latents(latents [N, d])` → the step text of each latent."""

    def __init__(self, decoder, decoder_proj, tokenizer):
        super().__init__()
        self.decoder, self.tokenizer = decoder, tokenizer
        self.parts = nn.ModuleDict({"decoder": decoder, **({"decoder_proj": decoder_proj} if decoder_proj else {})})

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, max_new_tokens: int = 32) -> list[str]:
        from pipeline.methods import step_decoder

        cfg = Config()
        cfg.method.simcot.decoder = "separate" if "decoder_proj" in self.parts else "full"
        return step_decoder.generate_steps(self.parts, cfg, latents, self.tokenizer, max_new_tokens)


def _load_extras(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = path / EXTRA_FILE
    tensors = load_file(str(file)) if file.is_file() else {}
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_exported(path: str | Path, dtype: str = "fp32", device: str = "cpu") -> Exported:
    """Model, tokenizer, latent_meta.json, projection (fp32), step decoder and (SoftCoT) assistant of an export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta_file = path / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {"method": "cot", "num_latents": 0}
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    if meta.get("lora") == "adapter" and not hasattr(model, "peft_config"):
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(path))
    model.to(device).eval()
    projection = None
    spec = meta.get("projection")
    if spec:
        if spec.get("kind") == "codi_mlp":
            from pipeline.methods.codi import LatentProjection
            projection = LatentProjection(spec["hidden_size"], spec["inner_size"])
        elif spec.get("kind") == "linear":       # SoftCoT: Linear(d_assist → d_base)
            projection = nn.Linear(spec["in_features"], spec["out_features"], bias=spec.get("bias", True))
        else:
            raise ValueError(f"{meta_file}: unknown projection kind {spec.get('kind')!r}")
        projection.load_state_dict(_load_extras(path, "projection"))
        projection.to(device).eval()
    assistant = assistant_tok = None
    if meta.get("assistant_dir") and (path / meta["assistant_dir"]).is_dir():
        assistant_path = str(path / meta["assistant_dir"])
        assistant = AutoModelForCausalLM.from_pretrained(assistant_path, dtype=torch_dtype(dtype)).to(device).eval()
        assistant_tok = AutoTokenizer.from_pretrained(assistant_path)
    step_decoder = None
    if meta.get("has_step_decoder") and (path / DECODER_DIR).is_dir():
        decoder = AutoModelForCausalLM.from_pretrained(str(path / DECODER_DIR), dtype=torch_dtype(dtype))
        proj_state = _load_extras(path, "decoder_proj")
        proj = None
        if proj_state:
            proj = nn.Linear(proj_state["weight"].shape[1], proj_state["weight"].shape[0])
            proj.load_state_dict(proj_state)
        dec_tok = AutoTokenizer.from_pretrained(str(path / DECODER_DIR))
        step_decoder = ExportedStepDecoder(decoder, proj, dec_tok).to(device).eval()
    return Exported(model=model, tokenizer=tokenizer, meta=meta, projection=projection, step_decoder=step_decoder,
                    assistant=assistant, assistant_tokenizer=assistant_tok)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description="offline export of a checkpoint")
    p.add_argument("checkpoint", help="output_dir/checkpoints/step_N")
    p.add_argument("out_dir")
    p.add_argument("--config", help="the run's config (default: output_dir/config.yaml)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    print(export_from_checkpoint(args.checkpoint, args.out_dir, args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
