"""`latent-train --plan`: parameters and per-GPU memory of a config on a cluster, without weights.

    latent-train --plan --config recipes/configs/llama8b_simcot.yaml deepspeed.world_size=8 [--gpu-memory-gb 80]

The architecture comes from a meta-device model (no weights allocated): for hub names, the
config.json shipped under recipes/model_configs/<name>/ when there is one (no network needed),
else transformers' AutoConfig. Output format (tests/test_engine_plan.py checks it):

    memory plan: <config file>
    model       <name> (<model_type>, hidden H, L layers, vocab V incl. 5 latent tokens), dtype D
    method      <method> [(base …, decoder …)], N latents
    cluster     W GPUs = N nodes x G, M GB each; micro batch B x accumulation A = global batch T
    parameters                 total       trainable
      base            <int with commas>  <int>
      lora                          …       …      (adapters + trainable latent-token rows)
      decoder                       …       …      (SIM-CoT step decoder; 0 otherwise)
      assistant                     …       0      (SoftCoT only: the frozen assistant)
      projection                    …       …      (SoftCoT++: + S initial-token embeddings)
      total                         …       …
    model states per GPU, GB   no offload   offload optim   offload optim+params
      ZeRO-2                        x.x            x.x             -
      ZeRO-3                        x.x            x.x             x.x
    activations per GPU, GB    (micro batch B, …token assumptions…)
      rollout                       x.x
      logits                        x.x
      total                         x.x
    verdict     ZeRO-S[ offload …] (template T): model states x.x + activations x.x [+ held rollout weights x.x] = x.x GB of M GB: fits|DOES NOT FIT
    parameter traffic per GPU per optimizer step, GB all-gathered (docs/ZERO3.md)
      option                      template              gathered  inter-node    memory  fits in 90%
      ZeRO-2                      zero2                      x.x         x.x       x.x  yes|no
      ZeRO-3                      zero3                      …
      ZeRO-3 keep rollout         zero3_resident             …
      ZeRO-3 keep rollout + hpZ   zero3_resident_hpz         …                              (several nodes only)
    recommend   <option> (template T): the least parameter traffic that fits in 90% of M GB

Model states: DeepSpeed's estimators for the trainable parameters (16 bytes each in mixed
precision, plus its buffer factors), plus the frozen weights (2 bytes in bf16, 4 in fp32) kept
whole on every GPU under ZeRO-2, 1/W of them under ZeRO-3, none with parameter offload.
Traffic: pipeline/plan_traffic.py (formulas there and in docs/ZERO3.md).
Activations: no activation checkpointing (it breaks the cached latent rollout); sequences of
data.max_tokens tokens (256 when unset) for the explicit/teacher pass, the same plus the latents
and markers for the student pass, (latents) x (1 + method.simcot.max_step_tokens) decoder tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.config import REPO_ROOT, Config, ModelConfig, resolve_ds_template
from pipeline.models import LATENT_TOKENS, lora_targets, meta_model
from pipeline.plan_traffic import HEADROOM, model_uses, recommend, traffic_options

MODEL_CONFIGS = REPO_ROOT / "recipes" / "model_configs"
DEFAULT_SEQ = 256
GB = 1024 ** 3


@dataclass
class Plan:
    title: str
    model_line: str
    method_line: str
    cluster_line: str
    params: dict[str, tuple[int, int]]          # part -> (total, trainable)
    states: dict[str, dict]                      # estimator name -> {"gpu", "cpu"} bytes (frozen included)
    activations: dict[str, float]                # name -> bytes
    activation_note: str
    verdict: str
    fits: bool
    traffic: list = dataclasses.field(default_factory=list)     # plan_traffic.TrafficOption per ZeRO choice
    recommendation: str = ""


def _resolve(model: ModelConfig) -> ModelConfig:
    """A hub name with a shipped config.json → that directory (the plan never needs the network)."""
    shipped = MODEL_CONFIGS / Path(model.name_or_path).name
    if model.name_or_path not in ("tiny-llama", "tiny-gpt2") and (shipped / "config.json").is_file():
        return dataclasses.replace(model, name_or_path=str(shipped), gguf_file=None)
    return model


def _meta(model: ModelConfig) -> nn.Module:
    return meta_model(_resolve(model), model.tiny.vocab_size)


def _dims(model: nn.Module) -> dict:
    c = model.config.get_text_config()
    heads = c.num_attention_heads
    hidden = c.hidden_size
    kv = getattr(c, "num_key_value_heads", None) or heads
    return {"hidden": hidden, "layers": c.num_hidden_layers, "vocab": c.vocab_size + len(LATENT_TOKENS),
            "inter": getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden,
            "kv": hidden * kv // heads, "tied": bool(getattr(c, "tie_word_embeddings", False))}


def _count(model: nn.Module) -> int:
    """Parameters after adding the latent tokens (embedding rows, and LM-head rows when untied)."""
    d = _dims(model)
    extra = len(LATENT_TOKENS) * d["hidden"] * (1 if d["tied"] else 2)
    return sum(p.numel() for p in model.parameters()) + extra


def _lora_count(model: nn.Module, mcfg: ModelConfig, r: int) -> int:
    targets = lora_targets(model, mcfg)
    total = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and hasattr(module, "weight") and module.weight.dim() == 2:
            total += r * sum(module.weight.shape)     # A [r, in] + B [out, r] (Conv1D is transposed: same sum)
    return total


def _largest_layer(model: nn.Module) -> int:
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def _act_bytes_per_token(d: dict, width: int) -> float:
    """Saved activations per token per layer (bf16 = 2 bytes): norms, q/k/v, rotary q/k, attention
    output and o_proj input (≈ 6h + 3 kv), gate/up/act/product of the MLP (≈ 4 I)."""
    return width * (6 * d["hidden"] + 3 * d["kv"] + 4 * d["inter"])


def make_plan(cfg: Config, config_path: str | None = None, gpu_memory_gb: float = 80.0,
              gpus_per_node: int | None = None) -> Plan:
    from pipeline.strategy import estimate_model_states

    world = cfg.deepspeed.world_size or 1
    per_node = gpus_per_node or min(world, 8)
    nodes = math.ceil(world / per_node)
    base = _meta(cfg.model)
    d = _dims(base)
    lora_on = cfg.model.lora.enabled
    base_n = _count(base)
    m = cfg.method
    base_frozen = lora_on or m.name == "softcot"          # SoftCoT: the base is frozen (LoRA adds to it)
    params = {"base": (base_n, 0 if base_frozen else base_n)}
    lora_n = (_lora_count(base, cfg.model, cfg.model.lora.r) + len(LATENT_TOKENS) * d["hidden"]) if lora_on else 0
    params["lora"] = (lora_n, lora_n)
    latent_base = m.simcot.base if m.name == "simcot" else m.name
    n_latents = {"codi": m.num_latents, "coconut": m.coconut.max_latent_stage * m.coconut.c_thought,
                 "softcot": m.softcot.num_thoughts}.get(latent_base, 0)
    dec_n, dec_dims = 0, None
    if m.name == "simcot":
        if m.simcot.decoder == "full":
            dec_n, dec_dims = base_n, d
        elif m.simcot.decoder == "shared":
            dec_n, dec_dims = _lora_count(base, cfg.model, m.simcot.decoder_lora_r), d
        else:
            dec_model = _meta(ModelConfig(name_or_path=m.simcot.decoder_model, tiny=cfg.model.tiny))
            dec_dims = _dims(dec_model)
            dec_n = _count(dec_model) + d["hidden"] * dec_dims["hidden"] + dec_dims["hidden"]
    params["decoder"] = (dec_n, dec_n)
    proj_n, assist_dims = 0, None
    sets = m.softcot.num_thought_sets if m.name == "softcot" else 1     # SoftCoT++: S copies of every sequence
    if m.name == "softcot":     # a frozen assistant + Linear(d_assist → d_base) [+ S initial tokens]
        assistant = _meta(ModelConfig(name_or_path=m.softcot.assistant_model, gguf_file=m.softcot.assistant_gguf_file,
                                      tiny=cfg.model.tiny))
        assist_dims = _dims(assistant)
        params["assistant"] = (_count(assistant), 0)
        proj_n = assist_dims["hidden"] * d["hidden"] + d["hidden"] + (sets * assist_dims["hidden"] if sets > 1 else 0)
    if latent_base == "codi" and m.codi.projection:
        h, inner = d["hidden"], m.codi.projection_inner_size or d["hidden"]
        proj_n = 2 * h * inner + inner + h + 2 * h       # Linear, Linear, LayerNorm
    params["projection"] = (proj_n, proj_n)
    trainable = sum(t for _, t in params.values())
    frozen = sum(n for n, _ in params.values()) - trainable
    params["total"] = (trainable + frozen, trainable)

    # Model states: DeepSpeed's estimators (trainable) + frozen weights where they live.
    width = 2 if cfg.model.dtype == "bf16" else 4
    states = estimate_model_states(trainable, _largest_layer(base), per_node, nodes)
    for name, s in states.items():
        if name.startswith("zero2"):
            s["gpu"] += frozen * width
        elif name != "zero3_offload_all":
            s["gpu"] += frozen * width / world

    # Activations of one micro batch through the rollout (no activation checkpointing).
    seq = cfg.data.max_tokens or DEFAULT_SEQ
    micro = cfg.train.per_device_train_batch_size
    passes = {"cot": seq, "nocot": seq, "coconut": seq + n_latents + 2, "codi": 2 * seq + n_latents + 2,
              "softcot": seq + n_latents + 2}
    main_tokens = micro * sets * passes[latent_base]
    dec_tokens = micro * n_latents * (1 + m.simcot.max_step_tokens) if dec_dims else 0
    acts = {"rollout": main_tokens * d["layers"] * _act_bytes_per_token(d, width)}
    if assist_dims:             # plain SoftCoT: no grad through the assistant, one layer's activations at a time;
        # SoftCoT++: the initial tokens train through it, so all its layers' activations are kept, S x
        layers = assist_dims["layers"] if sets > 1 else 1
        acts["assistant"] = micro * sets * (seq + n_latents) * layers * _act_bytes_per_token(assist_dims, width)
    logit_tokens = main_tokens
    if dec_dims:
        acts["step decoder"] = dec_tokens * dec_dims["layers"] * _act_bytes_per_token(dec_dims, width)
        logit_tokens += dec_tokens
    # logits in the model dtype + the fp32 copy the CE takes + its gradient
    acts["logits"] = logit_tokens * d["vocab"] * (width + 8)
    acts["total"] = sum(acts.values())
    note = (f"micro batch {micro}" + (f" x {sets} thought sets" if sets > 1 else "")
            + f", {passes[latent_base]} tokens/row through the main model"
            + (f", {n_latents} x {1 + m.simcot.max_step_tokens} decoder tokens/row" if dec_dims else "")
            + f"; seq {seq} = data.max_tokens" + (" (unset: assumed)" if not cfg.data.max_tokens else ""))

    accum = cfg.train.gradient_accumulation_steps
    stage, offload = _configured(cfg)
    key = {(2, "none"): "zero2", (2, "optim"): "zero2_offload", (3, "none"): "zero3", (3, "optim"): "zero3_offload_optim",
           (3, "all"): "zero3_offload_all"}.get((stage, offload))
    need_states = states[key]["gpu"] if key else (16 * trainable + frozen * width)   # ZeRO-0/1: everything whole
    need = need_states + acts["total"]
    traffic = traffic_options(model_uses(cfg, params, n_latents), width=width, accumulation=accum, world=world,
                              per_node=per_node, states=states, activations=acts["total"],
                              gpu_memory=gpu_memory_gb * GB)
    # A "resident" template also holds the rollout's weights gathered for the whole step.
    chosen = next((o for o in traffic if o.template == cfg.deepspeed.template and "resident" in o.template), None)
    held = max(0.0, chosen.memory - need) if chosen else 0.0
    need += held
    fits = need <= gpu_memory_gb * GB
    verdict = (f"ZeRO-{stage}{'' if offload == 'none' else ' offload ' + offload} (template {cfg.deepspeed.template}): "
               f"model states {need_states / GB:.1f} + activations {acts['total'] / GB:.1f}"
               + (f" + held rollout weights {held / GB:.1f}" if held else "")
               + f" = {need / GB:.1f} GB of {gpu_memory_gb:g} GB: {'fits' if fits else 'DOES NOT FIT'}")
    model_line = (f"{cfg.model.name_or_path} ({base.config.model_type}, hidden {d['hidden']}, {d['layers']} layers, "
                  f"vocab {d['vocab']} incl. {len(LATENT_TOKENS)} latent tokens), dtype {cfg.model.dtype}")
    method_line = m.name + (f" (base {m.simcot.base}, decoder {m.simcot.decoder})" if m.name == "simcot" else "") \
        + (f" (assistant {m.softcot.assistant_model}" + (f", {sets} thought sets" if sets > 1 else "") + ")"
           if m.name == "softcot" else "") \
        + f", {n_latents} latents"
    cluster_line = (f"{world} GPUs = {nodes} node{'s' if nodes > 1 else ''} x {per_node}, {gpu_memory_gb:g} GB each; "
                    f"micro batch {micro} x accumulation {accum} = global batch {micro * accum * world}")
    best = recommend(traffic)
    recommendation = (f"{best.name} (template {best.template}): the least parameter traffic that fits in "
                      f"{HEADROOM:.0%} of {gpu_memory_gb:g} GB" if best else
                      f"none of these fits in {HEADROOM:.0%} of {gpu_memory_gb:g} GB: offload (templates "
                      f"zero3_offload_optim, zero3_offload_all), more GPUs or a smaller micro batch")
    return Plan(f"memory plan: {config_path or 'embedded default config'}", model_line, method_line, cluster_line,
                params, states, acts, note, verdict, fits, traffic, recommendation)


def _configured(cfg: Config) -> tuple[int, str]:
    """(ZeRO stage, "none" | "optim" | "all") of the configured template."""
    if not cfg.deepspeed.enabled:
        return 0, "none"
    template = json.loads(resolve_ds_template(cfg.deepspeed.template).read_text())
    zero = template.get("zero_optimization", {})
    stage = cfg.deepspeed.zero_stage if cfg.deepspeed.zero_stage is not None else zero.get("stage", 0)
    optim = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    param = zero.get("offload_param", {}).get("device", "none") != "none"
    return stage, "all" if param else ("optim" if optim else "none")


def format_plan(plan: Plan) -> str:
    gb = lambda b: f"{b / GB:.1f}"  # noqa: E731
    s = plan.states
    lines = [plan.title, f"model       {plan.model_line}", f"method      {plan.method_line}",
             f"cluster     {plan.cluster_line}", f"{'parameters':<18}{'total':>17}{'trainable':>17}"]
    lines += [f"  {name:<16}{total:>17,}{train:>17,}" for name, (total, train) in plan.params.items()]
    lines += [f"{'model states per GPU, GB':<26}{'no offload':>12}{'offload optim':>15}{'offload optim+params':>22}",
              f"  {'ZeRO-2':<24}{gb(s['zero2']['gpu']):>12}{gb(s['zero2_offload']['gpu']):>15}{'-':>22}",
              f"  {'ZeRO-3':<24}{gb(s['zero3']['gpu']):>12}{gb(s['zero3_offload_optim']['gpu']):>15}"
              f"{gb(s['zero3_offload_all']['gpu']):>22}",
              f"activations per GPU, GB   ({plan.activation_note})"]
    lines += [f"  {name:<24}{gb(value):>12}" for name, value in plan.activations.items()]
    lines.append(f"verdict     {plan.verdict}")
    lines.append("parameter traffic per GPU per optimizer step, GB all-gathered (docs/ZERO3.md)")
    lines.append(f"  {'option':<28}{'template':<20}{'gathered':>10}{'inter-node':>12}{'memory':>10}  "
                 f"fits in {HEADROOM:.0%}")
    lines += [f"  {o.name:<28}{o.template:<20}{gb(o.gathered):>10}{gb(o.inter_node):>12}{gb(o.memory):>10}  "
              f"{'yes' if o.fits else 'no'}" for o in plan.traffic]
    lines.append(f"recommend   {plan.recommendation}")
    return "\n".join(lines)
