"""Read continuous thoughts as text.

For a batch of questions, roll out the latents exactly as at inference (CODI/SIM-CoT: `<bot>` and
`num_latents`; Coconut: `<|start-latent|>` and K·c), then for every latent:

* `top_tokens`: the k most likely next tokens from the LM head applied to the hidden state the
  latent was made from (the last-layer hidden state after the final norm, *before* the CODI
  projection) — what the model would have said as text at that point;
* `step_text`: the step decoder's greedy text for the latent (SIM-CoT only; the same input the
  decoder was trained on, i.e. the latent *after* the projection), else None.

    from pipeline.interpret import explain_latents
    rows = explain_latents(loaded, parts, cfg, ["Tom has 3 apples ..."], top_k=5)
    rows[0][2].step_text, rows[0][2].top_tokens      # latent 2 of question 0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.latent import embed, forward_step, left_pad, rollout_latents
from pipeline.methods import coconut, step_decoder
from pipeline.methods.batching import encode_prompt, model_device, optional_part


@dataclass
class LatentExplanation:
    step_text: str | None                  # step decoder's greedy text; None without a decoder
    top_tokens: list[tuple[str, float]]    # (token text, probability) from the LM head


def _latent_setup(cfg: Config) -> tuple[str, int]:
    """(start token key in LoadedModel.token_ids, number of latents) of the configured method."""
    base = cfg.method.simcot.base if cfg.method.name == "simcot" else cfg.method.name
    if base == "coconut":
        return "start_latent", coconut.inference_num_latents(cfg)
    if base == "codi":
        return "bot", cfg.method.num_latents
    raise ValueError(f"method.name: {cfg.method.name!r} has no latents to explain")


@torch.no_grad()
def rollout_for_questions(loaded, parts: nn.ModuleDict, cfg: Config,
                          questions: list[str]) -> tuple[Tensor, Tensor]:
    """(latents [B, n, d] fed back, hidden states [B, n, d] they were made from)."""
    lm = parts["lm"]
    start, n = _latent_setup(cfg)
    prompts = [encode_prompt(loaded.tokenizer, q) + [loaded.token_ids[start]] for q in questions]
    ids, mask = left_pad(prompts, loaded.tokenizer.pad_token_id)
    device = model_device(lm)
    _, state = forward_step(lm, embed(lm, ids.to(device)), mask.to(device), None)
    projection = optional_part(parts, "projection")
    hidden: list[Tensor] = []

    def project(h: Tensor) -> Tensor:       # records the pre-projection hidden state
        hidden.append(h)
        return projection(h) if projection is not None else h

    latents, _, _ = rollout_latents(lm, state, n, project=project)
    return latents, torch.stack(hidden, dim=1) if hidden else latents


@torch.no_grad()
def explain_latents(loaded, parts: nn.ModuleDict, cfg: Config, questions: list[str], *, top_k: int = 5,
                    max_new_tokens: int | None = None) -> list[list[LatentExplanation]]:
    """One list of LatentExplanation per question, one entry per latent."""
    was_training = parts.training
    parts.eval()
    try:
        latents, hidden = rollout_for_questions(loaded, parts, cfg, questions)
        bsz, n, _ = latents.shape
        lm_head = parts["lm"].get_output_embeddings()
        probs = torch.softmax(lm_head(hidden).float(), dim=-1)                       # [B, n, V]
        top_p, top_i = probs.topk(top_k, dim=-1)
        texts: list[str | None] = [None] * (bsz * n)
        if cfg.method.name == "simcot" and step_decoder.has_decoder(parts, cfg) and n:
            tok = step_decoder.decoder_tokenizer(cfg, loaded)
            texts = step_decoder.generate_steps(parts, cfg, latents.reshape(bsz * n, -1), tok,
                                                max_new_tokens or cfg.method.simcot.max_step_tokens)
    finally:
        parts.train(was_training)
    decode = loaded.tokenizer.decode
    return [[LatentExplanation(step_text=texts[b * n + k],
                               top_tokens=[(decode([int(i)]), float(p)) for p, i in zip(top_p[b, k], top_i[b, k])])
             for k in range(n)] for b in range(bsz)]
