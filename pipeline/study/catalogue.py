"""What the study trains: the data it reads, the shared tiny-model recipe, and one entry per method.

Every method is a list of dotted overrides on top of the shared recipe (`COMMON`), so a cell of
the study is exactly `latent-train <COMMON> <method overrides> <data> <seed>`; `init: "cot"` makes a
method start from the CoT-SFT export of the same seed (Coconut, as the paper does). Each cell
writes its resolved config to OUT/runs/<method>/seed<k>/config.yaml, which `latent-train --config`
reruns as it is; docs/RESULTS.md explains the choices and reports the results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.schema import REPO_ROOT

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# The tiny LLaMA and schedule every method shares (issue 13 explains each choice; docs/RESULTS.md).
COMMON: dict[str, object] = {
    "model.name_or_path": "tiny-llama",
    "model.tiny.hidden_size": 128,
    "model.tiny.num_layers": 4,
    "model.tiny.num_heads": 4,
    "model.tiny.intermediate_size": 384,
    "train.per_device_train_batch_size": 32,
    "train.learning_rate": 1e-3,
    "train.lr_scheduler_type": "cosine",
    "train.warmup_ratio": 0.03,
    # 1,200 steps (1.9 epochs): the latent methods pass their phase transition between 800 and 1,200
    # steps, CoT-SFT between 300 and 600; at 400 steps they sat at No-CoT's level (docs/RESULTS.md).
    "train.max_steps": 1200,
    "train.eval_steps": 200,
    "train.logging_steps": 50,
    "train.save_steps": None,
    "train.metric_for_best_model": "accuracy",
    "train.load_best_model_at_end": True,
    "eval.batch_size": 100,
}

# --quick (the README demo, <= 10 min): a third of the training (before the latent methods' phase
# transition: it shows the pipeline end to end, not the study's result), 3 methods, one seed.
QUICK: dict[str, object] = {"train.max_steps": 400, "train.eval_steps": 200}


# Methods that continue from the CoT-SFT export (already trained for COMMON's steps) train half as
# long: all 3 Coconut stages are reached at step 300, and the full study stays near 90 minutes.
_AFTER_COT: dict[str, object] = {"train.max_steps": 600}


@dataclass(frozen=True)
class MethodSpec:
    label: str
    description: str
    overrides: dict[str, object]
    init: str | None = None               # "cot": start from the CoT-SFT export of the same seed
    init_override: str = "method.coconut.init_from"
    latent: bool = True                   # evaluated at 1x and 2x its latents
    simcot: bool = False                  # has a step decoder: the interpretability figure


METHODS: dict[str, MethodSpec] = {m.label: m for m in (
    MethodSpec("nocot", "No-CoT: CE on the answer only", {"method.name": "nocot"}, latent=False),
    MethodSpec("cot", "CoT-SFT: CE on the written steps and the answer", {"method.name": "cot"}, latent=False),
    MethodSpec("coconut", "Coconut: stage-wise replacement of steps by latents, from the CoT-SFT model",
               {"method.name": "coconut", "method.coconut.c_thought": 1, "method.coconut.max_latent_stage": 3,
                "method.coconut.steps_per_stage": 100, **_AFTER_COT}, init="cot"),
    MethodSpec("codi", "CODI: self-distillation, single stage, from scratch", {"method.name": "codi"}),
    MethodSpec("simcot", "CODI + SIM-CoT, full step decoder (the paper's)",
               {"method.name": "simcot", "method.simcot.decoder": "full", "train.export_step_decoder": True},
               simcot=True),
    MethodSpec("simcot_shared", "CODI + SIM-CoT, shared-weights decoder (LoRA on the CoT-SFT model)",
               {"method.name": "simcot", "method.simcot.decoder": "shared", "model.lora.enabled": True,
                "model.lora.r": 64, "model.lora.alpha": 64, "model.lora.dropout": 0.0,
                "train.export_step_decoder": True},
               init="cot", init_override="model.name_or_path", simcot=True),
    MethodSpec("coconut_simcot", "Coconut + SIM-CoT (full decoder), from the CoT-SFT model",
               {"method.name": "simcot", "method.simcot.base": "coconut", "method.simcot.decoder": "full",
                "method.coconut.c_thought": 1, "method.coconut.max_latent_stage": 3,
                "method.coconut.steps_per_stage": 100, "train.export_step_decoder": True, **_AFTER_COT},
               init="cot", simcot=True),
)}

# Issue 13's ablations: the study recipe of one method with one thing changed (docs/RESULTS.md).
# Not in the default study; `latent-study --methods simcot,simcot_beta20 --seeds 2` runs them.
_SIMCOT = METHODS["simcot"].overrides
ABLATIONS: dict[str, MethodSpec] = {m.label: m for m in (
    MethodSpec("simcot_beta20", "CODI + SIM-CoT, full decoder, distillation weight beta = 20 (the paper's LLaMA value)",
               {**_SIMCOT, "method.codi.beta": 20.0}, simcot=True),
    MethodSpec("simcot_2x", "CODI + SIM-CoT, full decoder, 2 latents per step (10 latents)",
               {**_SIMCOT, "method.simcot.latents_per_step": 2, "method.num_latents": 10}, simcot=True),
    MethodSpec("simcot_main", "CODI + SIM-CoT, the main model decodes its own latents (decoder = main)",
               {**_SIMCOT, "method.simcot.decoder": "main"}, simcot=True),
    MethodSpec("simcot_last", "CODI + SIM-CoT, full decoder, teacher keeps the last step (include_last_step)",
               {**_SIMCOT, "method.codi.include_last_step": True}, simcot=True),
    MethodSpec("simcot_noproj", "CODI + SIM-CoT, full decoder, no projection (the hidden state fed back as is)",
               {**_SIMCOT, "method.codi.projection": False}, simcot=True),
    MethodSpec("simcot_repeat", "CODI + SIM-CoT, full decoder, latents after the last step repeat it (extra_latents)",
               {**_SIMCOT, "method.simcot.extra_latents": "repeat_last"}, simcot=True),
    MethodSpec("simcot_explain3", "CODI + SIM-CoT, full decoder, explain_weight 3",
               {**_SIMCOT, "method.simcot.explain_weight": 3.0}, simcot=True),
    MethodSpec("simcot_distill_end", "CODI + SIM-CoT, full decoder, distilled where the reasoning ends (<eot>)",
               {**_SIMCOT, "method.codi.distill_position": "after_reasoning"}, simcot=True),
    # Curriculum for CODI: stages 1-5 (k latents for the first k steps, the rest written) 100 steps each,
    # as Coconut's stages here, then plain CODI from step 500 to the recipe's 1,200.
    MethodSpec("simcot_gradual", "CODI + SIM-CoT, full decoder, gradual schedule (a stage per 100 steps)",
               {**_SIMCOT, "method.codi.gradual_steps_per_stage": 100}, simcot=True),
    # Initialisation: the CoT-SFT export of the same seed, fine-tuned for the recipe's 1,200 steps at
    # a third of its learning rate (a fine-tune's; the CoT-SFT weights already hold the task).
    MethodSpec("simcot_fromcot", "CODI + SIM-CoT, full decoder, from the CoT-SFT model (lr 3e-4)",
               {**_SIMCOT, "train.learning_rate": 3e-4}, init="cot", init_override="model.name_or_path",
               simcot=True),
    # Model size: the width (and the MLP with it, 3x) around COMMON's 128; depth and heads stay.
    MethodSpec("simcot_h64", "CODI + SIM-CoT, full decoder, a narrower model (hidden 64, MLP 192)",
               {**_SIMCOT, "model.tiny.hidden_size": 64, "model.tiny.intermediate_size": 192}, simcot=True),
    MethodSpec("simcot_h256", "CODI + SIM-CoT, full decoder, a wider model (hidden 256, MLP 768)",
               {**_SIMCOT, "model.tiny.hidden_size": 256, "model.tiny.intermediate_size": 768}, simcot=True),
)}
METHODS.update(ABLATIONS)

# The full study: 15 cells, ~90 min on 2 cores at 1,200 steps. The shared-decoder SIM-CoT and
# Coconut + SIM-CoT stay in METHODS (`--methods`): with them a study takes ~2.5 h at this length.
DEFAULT_METHODS = ("nocot", "cot", "coconut", "codi", "simcot")
QUICK_METHODS = ("nocot", "simcot", "cot")     # the slowest (SIM-CoT) starts first


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class StudyData:
    """Where a study's splits are and how the trainer and the harness read them."""
    name: str
    format: str                 # data format for latent-train (gsm8k_aug, prosqa, prontoqa)
    benchmark: str              # benchmark name for latent-eval
    train: str
    valid: str
    test: str
    train_limit: int | None = None
    notes: list[str] = field(default_factory=list)
    tokenizer: str | None = None   # built from the task's training text (ensure_tokenizer)

    def overrides(self) -> dict[str, object]:
        train = {"format": self.format, "path": self.train}
        if self.train_limit:
            train["max_examples"] = self.train_limit
        out: dict[str, object] = {"data.train": [train], "data.eval": [{"format": self.format, "path": self.valid}]}
        if self.tokenizer:
            out["model.tokenizer"] = self.tokenizer
        return out


def ensure_tokenizer(data: StudyData, out: Path) -> StudyData:
    """A byte-level BPE (digits kept single) trained on the task's own training text, once per study:
    the task's words become single tokens, so sequences are short and a 2-core CPU trains faster
    than with the generic tokenizer tiny models build from the shipped GSM8K slices."""
    from dataclasses import replace

    from pipeline.tokenizer_build import TASK_VOCAB_SIZE, build_tokenizer, file_texts

    directory = out / "tokenizer"
    if not (directory / "tokenizer.json").is_file():
        build_tokenizer(file_texts(data.train), directory, vocab_size=TASK_VOCAB_SIZE)
    return replace(data, tokenizer=str(directory))


def resolve_data(spec: str, out: Path) -> StudyData:
    """`--data`: a directory with train/valid/test.txt (GSM8k-Aug lines), `chain` (the shipped
    synthetic task, generated into OUT/data), `prontoqa` or `prosqa` (the shipped files), or a
    directory holding those files."""
    from pipeline.data.synthetic import TASKS, TaskSpec, write_task

    if spec in TASKS or spec.startswith("synthetic:"):
        task = spec.split(":", 1)[-1]
        directory = out / "data"
        if not (directory / "test.txt").is_file():
            write_task(TaskSpec(task=task), directory)
        return _txt_dir(directory, name=task, notes=[f"synthetic task {task!r} (pipeline.data.synthetic, seed 0)"])
    path = Path(spec)
    if spec in ("prontoqa", "prosqa"):
        path = SHARED_DATA / spec
    if (path / "prontoqa_train.json").is_file():
        return StudyData("prontoqa", "prontoqa", "prontoqa", str(path / "prontoqa_train.json"),
                         str(path / "prontoqa_valid.json"), str(path / "prontoqa_test.json"))
    if (path / "prosqa_valid.json").is_file():
        # No ProsQA train split ships (../shared/data/README.md): its 300 validation problems are split
        # 240 train / 60 validation (seeded, disjoint); the test file stays the test. Said in the report.
        return _prosqa_split(path, out / "data")
    if (path / "train.txt").is_file():
        return _txt_dir(path, name=path.name)
    raise FileNotFoundError(f"--data {spec}: expected a directory with train.txt, valid.txt and test.txt "
                            f"(GSM8k-Aug lines), 'chain', 'prontoqa', 'prosqa', or a directory of those files")


def _prosqa_split(path: Path, directory: Path) -> StudyData:
    import json
    import random

    directory.mkdir(parents=True, exist_ok=True)
    train, valid = directory / "prosqa_train.json", directory / "prosqa_valid.json"
    if not train.is_file():
        records = json.loads((path / "prosqa_valid.json").read_text())
        order = list(range(len(records)))
        random.Random("prosqa:0").shuffle(order)
        cut = len(records) * 4 // 5
        train.write_text(json.dumps([records[i] for i in order[:cut]]))
        valid.write_text(json.dumps([records[i] for i in order[cut:]]))
    return StudyData("prosqa", "prosqa", "prosqa", str(train), str(valid), str(path / "prosqa_test.json"),
                     notes=["no ProsQA train split ships: prosqa_valid.json (300) is split 240 train / 60 "
                            "validation (seeded); tested on prosqa_test.json (500)"])


def _txt_dir(directory: Path, name: str, notes: list[str] | None = None) -> StudyData:
    files = {s: directory / f"{s}.txt" for s in ("train", "valid", "test")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--data {directory}: missing {', '.join(missing)}")
    return StudyData(name, "gsm8k_aug", "gsm8k_aug", str(files["train"]), str(files["valid"]), str(files["test"]),
                     notes=notes or [])
