"""Loading never runs code (issue 10.1): a planted pickle as RNG state, as DeepSpeed's model or
optimizer states on resume and given to --export-from (ZeRO-0/2/3), and as coconut's init_from
weights. Every case: the payload's marker file is never created and the error names the file.
(The 2-rank case, a planted ZeRO-3 partition of rank 1, is in test_checkpoint_dist.py.)"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from planted import plant  # noqa: E402
from train_variants import TINY_OVERRIDES  # noqa: E402

from pipeline.config import load_config  # noqa: E402

ZERO = {0: ["deepspeed.template=zero0"],
        2: ["deepspeed.enabled=true", "deepspeed.template=zero2"],
        3: ["deepspeed.enabled=true", "deepspeed.template=zero3"]}


def overrides(out: Path, stage: int, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"train.output_dir={out}", "train.max_steps=2", "train.save_steps=1", *ZERO[stage],
            *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished run per ZeRO stage (checkpoints step_1 and step_2); tests plant into copies."""
    from pipeline.train import run

    base = tmp_path_factory.mktemp("safety")
    for stage in ZERO:
        run(load_config(None, overrides(base / f"zero{stage}", stage)))
    return base


def copy_run(runs: Path, stage: int, tmp_path: Path) -> Path:
    out = tmp_path / f"zero{stage}"
    shutil.copytree(runs / f"zero{stage}", out)
    return out


def resume(out: Path, stage: int) -> None:
    from pipeline.train import run

    run(load_config(None, overrides(out, stage, "train.max_steps=3")))


@pytest.mark.parametrize("name", ["rng_state_0.pt", "mp_rank_00_model_states.pt"])
def test_planted_pickle_on_resume_is_refused_by_name(runs, tmp_path, name):
    """rng_state_0.pt is where the RNG state used to be pickled; nothing may unpickle it now.
    A refused file stops the run (exit 2 from the CLI) rather than being skipped quietly."""
    out, marker = copy_run(runs, 0, tmp_path), tmp_path / "marker"
    target = out / "checkpoints" / "step_2" / name
    plant(target, marker)
    with pytest.raises(Exception) as err:
        resume(out, 0)
    assert not marker.exists()                  # first: no code ran, whatever the error
    from pipeline.checkpoint_files import CheckpointError
    assert err.type is CheckpointError and str(err.value).startswith(f"{target}: refused")


def test_pickle_posing_as_safetensors_rng_is_never_unpickled(runs, tmp_path, capsys):
    """The RNG state is safetensors now: a pickle there is unreadable data, never code; the
    checkpoint counts as damaged and the run resumes from the one before, naming the file."""
    out, marker = copy_run(runs, 0, tmp_path), tmp_path / "marker"
    target = out / "checkpoints" / "step_2" / "rng_state_0.safetensors"
    plant(target, marker)
    resume(out, 0)
    err = capsys.readouterr().err
    assert f"warning: {target}: unreadable" in err and "resuming from" in err and "step_1" in err
    assert not marker.exists()


@pytest.mark.parametrize("stage,name", [(0, "mp_rank_00_model_states.pt"),
                                        (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                        (3, "zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_deepspeed_engine_loads_with_the_allow_list_only(runs, tmp_path, stage, name):
    """Below the manifest check: DeepSpeed's own checkpoint engine, handed a planted file, refuses it."""
    from pipeline.strategy import Strategy
    from pipeline.train import build_module, load_run_tokenizer

    out, marker = copy_run(runs, stage, tmp_path), tmp_path / "marker"
    cfg = load_config(None, overrides(out, stage))
    module, _, loaded = build_module(cfg, load_run_tokenizer(cfg, out))
    strategy = Strategy(cfg)
    strategy.prepare(module, total_steps=2, hidden_size=loaded.hidden_size)
    strategy.load_checkpoint(str(out / "checkpoints"), "step_1")        # the genuine files load
    plant(out / "checkpoints" / "step_2" / name, marker)
    with pytest.raises(Exception) as err:
        strategy.load_checkpoint(str(out / "checkpoints"), "step_2")
    assert not marker.exists()
    from pipeline.strategy import CheckpointFileError
    assert err.type is CheckpointFileError and err.value.refused
    assert str(err.value).startswith(f"{out / 'checkpoints' / 'step_2' / name}: refused")


EXPORT_CASES = [(0, "mp_rank_00_model_states.pt"),
                (2, "mp_rank_00_model_states.pt"), (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"), (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt")]


@pytest.mark.parametrize("stage,name", EXPORT_CASES)
def test_export_from_refuses_planted_states(runs, tmp_path, capsys, stage, name):
    """--export-from, with the manifest rewritten (the scan refuses) and without one (an old or
    hand-copied checkpoint: the loader, zero_to_fp32's included, refuses): exit 2, file named."""
    from pipeline.train import main

    out, marker = copy_run(runs, stage, tmp_path), tmp_path / "marker"
    ckpt = out / "checkpoints" / "step_2"
    plant(ckpt / name, marker)
    for with_manifest in (True, False):
        if not with_manifest:
            (ckpt / "manifest.json").unlink(missing_ok=True)
        try:
            rc = main(["--export-from", str(ckpt), str(tmp_path / "export")])
        except Exception as exc:                # not a clean exit: still check the marker first
            rc = exc
        assert not marker.exists()
        assert rc == 2
        err = capsys.readouterr().err
        assert f"checkpoint error: {ckpt / name}: refused" in err, err[-2000:]
        assert not (tmp_path / "export").exists()


def test_export_from_a_genuine_checkpoint_still_works(runs, tmp_path):
    from pipeline.export import export_from_checkpoint, load_exported

    for stage in (2, 3):
        out = copy_run(runs, stage, tmp_path)
        exported = load_exported(export_from_checkpoint(out / "checkpoints" / "step_2", tmp_path / f"e{stage}"))
        assert exported.meta["method"] == "cot"


@pytest.mark.parametrize("adapter", [False, True])
def test_coconut_init_from_refuses_pickled_weights(build, tmp_path, adapter):
    from conftest import make_cfg

    source = build(make_cfg("cot", lora=adapter), seed=5, live_lora=False)
    export, marker = tmp_path / "export", tmp_path / "marker"
    if adapter:      # a base + LoRA export whose adapter is a pickle
        source.loaded.model.save_pretrained(export)
        source.loaded.model.unload().save_pretrained(export)
        (export / "adapter_model.safetensors").unlink()
        planted = export / "adapter_model.bin"
    else:
        source.loaded.model.save_pretrained(export)
        (export / "model.safetensors").unlink()
        planted = export / "pytorch_model.bin"
    plant(planted, marker)
    cfg = make_cfg("coconut")
    cfg.method.coconut.init_from = str(export)
    with pytest.raises(Exception) as err:
        build(cfg, seed=0, live_lora=False)
    assert not marker.exists()      # transformers and peft refuse such pickles too, but without naming them
    from pipeline.checkpoint_files import CheckpointError
    assert err.type is CheckpointError and f"method.coconut.init_from: {planted}: refused" in str(err.value)
