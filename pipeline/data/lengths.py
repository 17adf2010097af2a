"""How many tokens the configured method trains on for one example, for the `data.max_tokens` filter.

The filter must measure the sequence actually trained, not "question + every step": CODI's
teacher drops the last step by default (`method.codi.include_last_step=false`), No-CoT trains no
steps at all, latent methods put latents and markers in the sequence. The count is the longest
sequence (prompt + its continuation, latents included) of the method, over every sequence it
builds for the example (CODI: teacher and student; Coconut: every curriculum stage), built with
the collators' own encoding helpers so it matches what they produce.
"""
from __future__ import annotations

from collections.abc import Callable

from .example import Example

__all__ = ["trained_length"]


def trained_length(cfg, tokenizer) -> Callable[[Example], int]:
    """`count(example) -> tokens` for `cfg.method` (SIM-CoT: its base method; the step decoder's
    targets are separate sequences capped by `method.simcot.max_step_tokens`)."""
    from pipeline.latent import answer_text, cot_text
    from pipeline.methods.batching import answer_segment, encode, encode_prompt

    method = cfg.method.name
    if method == "simcot":
        method = cfg.method.simcot.base
    eos = 1

    def explicit(ex: Example) -> int:
        target = answer_text(ex.answer) if method == "nocot" else cot_text(ex.steps, ex.answer)
        return len(encode_prompt(tokenizer, ex.question)) + len(encode(tokenizer, target)) + eos

    def codi(ex: Example) -> int:
        steps = list(ex.steps) if cfg.method.codi.include_last_step else list(ex.steps)[:-1]
        question = len(encode_prompt(tokenizer, ex.question))
        answer = len(answer_segment(tokenizer, ex.answer)[0])
        teacher = question + len(encode(tokenizer, "".join(s + "\n" for s in steps))) + answer + eos
        student = question + 1 + cfg.method.num_latents + 1 + answer + eos      # <bot> latents <eot>
        return max(teacher, student)

    def coconut(ex: Example) -> int:
        from pipeline.methods.coconut import stage_layout, stage_for_epoch

        question = len(encode_prompt(tokenizer, ex.question))
        first = stage_for_epoch(0, cfg)
        longest = 0
        for stage in range(first, cfg.method.coconut.max_latent_stage + 1):
            n, _, rest = stage_layout(ex.steps, stage, cfg)
            markers = 2 if n else 0
            longest = max(longest, question + markers + n + len(encode(tokenizer, cot_text(rest, ex.answer))) + eos)
        return longest

    def softcot(ex: Example) -> int:
        from pipeline.methods.softcot import base_sequence

        prompt, trained = base_sequence(cfg, tokenizer, ex)     # exactly what the collate builds
        return len(prompt) + len(trained)

    return {"codi": codi, "coconut": coconut, "softcot": softcot}.get(method, explicit)
