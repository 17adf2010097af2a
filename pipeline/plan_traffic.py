"""Parameter traffic of one training step under each ZeRO choice, for `latent-train --plan`.

All-gathered bytes per GPU per optimizer step (the size of the gathered tensors; a GPU receives
(W-1)/W of them over the wire), what each choice costs in memory, and the cheapest that fits:

  ZeRO-2                 parameters replicated. After each optimizer step every trainable weight is
                         all-gathered once from the rank that updated it: trainable x width.
  ZeRO-3                 (template zero3) every forward call of a model gathers its weights again
                         (DeepSpeed's reuse window, 1e9 elements, is an eighth of one pass over an 8B
                         model, so nothing survives from one call to the next) and the backward
                         gathers them about once more: the KV cache ties the calls together layer by
                         layer, so autograd visits a layer's weights for all calls at once (measured:
                         backward 1.7 models for CODI's 9 calls, 0.8 for CoT-SFT's 1). Per micro
                         step: sum over models of (calls + 1 if gradients flow through it) x weights.
  ZeRO-3 keep rollout    (template zero3_resident) the weights of every model a micro step calls more
                         than once (the latent rollout's model) are gathered at their first use and
                         held until the optimizer step (Strategy's keep_params_gathered): once per
                         optimizer step; models called once are gathered as under ZeRO-3. Memory:
                         the held models whole on every GPU, on top of ZeRO-3's partitioned states.
  + hpZ                  (template zero3_resident_hpz, several nodes) ZeRO++'s secondary partition
                         inside each node: a weight released once keeps a copy partitioned over its
                         node, so every later gather of it comes from inside the node; frozen weights
                         keep it for good, trainable ones until the optimizer step. Across nodes: each
                         trainable weight once per optimizer step. Memory: + all weights / GPUs per node.

Across nodes: a gather over all W GPUs brings (W-G)/W of its bytes from other nodes (G = GPUs per
node). Gradient reduce-scatter traffic (2 bytes per trainable parameter per step, the same for all
choices) and persistent parameters (vectors of <= 1e5 elements, < 0.01 % of an 8B model, never
gathered under ZeRO-3) are left out. The ZeRO-3 figure was checked against
benchmarks/bench_zero3_traffic.py on a tiny model (docs/ZERO3.md).
"""
from __future__ import annotations

from dataclasses import dataclass

# An option "fits" when its estimate leaves a tenth of the GPU free: the CUDA context, allocator
# fragmentation and communication buffers are not in the estimate.
HEADROOM = 0.9


@dataclass
class ModelUse:
    """One model (or weight group) of the method: its size and how a micro step uses it."""
    name: str
    params: int            # elements
    trainable: int         # elements that train
    calls: int             # forward calls per micro step
    backward: bool         # whether the backward needs its weights again (gradients flow through it)


@dataclass
class TrafficOption:
    name: str
    template: str
    gathered: float        # bytes all-gathered per GPU per optimizer step
    inter_node: float      # of which come from other nodes
    memory: float          # bytes per GPU: model states (+ weights held whole) + activations
    fits: bool             # memory <= HEADROOM x the GPU


def model_uses(cfg, params: dict[str, tuple[int, int]], n_latents: int) -> list[ModelUse]:
    """The models a micro step runs and how often, from the method config and the plan's counts."""
    m = cfg.method
    latent_base = m.simcot.base if m.name == "simcot" else m.name
    lm_calls = {"cot": 1, "nocot": 1, "coconut": n_latents + 2, "codi": n_latents + 3, "softcot": 1}[latent_base]
    lm_params = params["base"][0] + params["lora"][0]
    lm_train = params["base"][1] + params["lora"][1]
    uses = []
    if m.name == "simcot" and m.simcot.decoder == "shared":     # the decoder is one more lm call
        lm_calls += 1
        lm_params, lm_train = lm_params + params["decoder"][0], lm_train + params["decoder"][1]
    uses.append(ModelUse("lm", lm_params, lm_train, lm_calls, True))
    if m.name == "simcot" and m.simcot.decoder != "shared":
        uses.append(ModelUse("decoder", *params["decoder"], 1, True))
    if "assistant" in params:      # SoftCoT: frozen, no gradient flows into it
        uses.append(ModelUse("assistant", *params["assistant"], 1, False))
    if params["projection"][0]:
        calls = n_latents if latent_base == "codi" else 1
        uses.append(ModelUse("projection", *params["projection"], calls, True))
    return uses


def traffic_options(uses: list[ModelUse], *, width: int, accumulation: int, world: int, per_node: int,
                    states: dict, activations: float, gpu_memory: float) -> list[TrafficOption]:
    """ZeRO-2, ZeRO-3, ZeRO-3 keep gathered and (several nodes) + hpZ, in that order."""
    nodes = max(1, world // per_node)
    remote = (world - per_node) / world if nodes > 1 else 0.0     # share of a world gather from other nodes
    weights = sum(u.params for u in uses) * width
    trainable = sum(u.trainable for u in uses) * width
    def lean(group):       # gathered by every call and once more in backward, every micro step
        return accumulation * sum((u.calls + u.backward) * u.params for u in group) * width

    held = [u for u in uses if u.calls > 1]
    held_bytes = sum(u.params for u in held) * width
    keep = held_bytes + lean([u for u in uses if u.calls <= 1])
    options = [
        ("ZeRO-2", "zero2", trainable, trainable * remote, states["zero2"]["gpu"]),
        ("ZeRO-3", "zero3", lean(uses), lean(uses) * remote, states["zero3"]["gpu"]),
        ("ZeRO-3 keep rollout", "zero3_resident", keep, keep * remote, states["zero3"]["gpu"] + held_bytes),
    ]
    if nodes > 1:
        options.append(("ZeRO-3 keep rollout + hpZ", "zero3_resident_hpz", keep, trainable * remote,
                        states["zero3"]["gpu"] + held_bytes + weights / per_node))
    return [TrafficOption(name, template, gathered, inter, memory + activations,
                          memory + activations <= HEADROOM * gpu_memory)
            for name, template, gathered, inter, memory in options]


def recommend(options: list[TrafficOption]) -> TrafficOption | None:
    """The option that fits with the least traffic across nodes, then in all, then memory."""
    fitting = [o for o in options if o.fits]
    return min(fitting, key=lambda o: (round(o.inter_node), round(o.gathered), o.memory)) if fitting else None
