"""A damaged checkpoint never loses progress silently (issue 10.2): manifests, fallback to the
newest intact checkpoint with a warning naming the problem, no silent restart from step 0,
pruning that keeps the last valid checkpoint and the best one. Single process (ZeRO-0); the
2-rank ZeRO-2/ZeRO-3 cases are in test_checkpoint_dist.py."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from planted import flip_byte, truncate  # noqa: E402
from train_variants import TINY_OVERRIDES  # noqa: E402

from pipeline.config import load_config  # noqa: E402

# 16 examples, batch 8: 2 steps per epoch; checkpoints at steps 2 and 4, both kept. A constant
# learning rate, so a rerun to step 5 follows the same trajectory as the run it resumes.
RUN = [*TINY_OVERRIDES, "train.max_steps=4", "train.save_steps=2", "train.save_total_limit=2",
       "train.lr_scheduler_type=constant"]


def train(out: Path, *extra: str) -> dict:
    from pipeline.train import run

    return run(load_config(None, [*RUN, f"train.output_dir={out}", *extra]))


def logged(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damage") / "run"
    train(out)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted 5-step run."""
    out = tmp_path_factory.mktemp("damage_ref") / "run"
    train(out, "train.max_steps=5")
    return logged(out)


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_every_checkpoint_has_a_manifest_of_its_files(finished):
    import zlib

    for tag in ("step_2", "step_4"):
        ckpt = finished / "checkpoints" / tag
        manifest = json.loads((ckpt / "manifest.json").read_text())
        names = sorted(p.name for p in ckpt.iterdir() if p.name != "manifest.json")
        assert sorted(manifest["files"]) == names and manifest["checksum"] == "crc32"
        assert {"train_state.json", "rng_state_0.safetensors", "mp_rank_00_model_states.pt"} <= set(names)
        for name, entry in manifest["files"].items():
            data = (ckpt / name).read_bytes()
            assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert (finished / "checkpoints" / "latest").read_text() == "step_4"
    assert not list((finished / "checkpoints").glob(".*"))      # no temp dir left behind


def damage_model(ckpt: Path) -> str:
    truncate(ckpt / "mp_rank_00_model_states.pt")
    return f"{ckpt / 'mp_rank_00_model_states.pt'}: "


def damage_rng(ckpt: Path) -> str:
    truncate(ckpt / "rng_state_0.safetensors")
    return f"{ckpt / 'rng_state_0.safetensors'}: "


def flip_model(ckpt: Path) -> str:
    flip_byte(ckpt / "mp_rank_00_model_states.pt")
    return f"{ckpt / 'mp_rank_00_model_states.pt'}: CRC32 differs"


def no_manifest(ckpt: Path) -> str:
    (ckpt / "manifest.json").unlink()
    return f"{ckpt}: no manifest.json"


def garbage_latest(ckpt: Path) -> str:
    (ckpt.parent / "latest").write_bytes(b"\x00garbage\xff")
    return f"{ckpt.parent / 'latest'} names"


def latest_missing_dir(ckpt: Path) -> str:
    (ckpt.parent / "latest").write_text("step_8")
    return f"{ckpt.parent / 'latest'} names 'step_8', a directory that does not exist"


def half_written_temp_dir(ckpt: Path) -> str:
    """What a kill during the save of step 6 leaves: a temp dir with some files, no manifest."""
    tmp = ckpt.parent / ".tmp-step_6"
    shutil.copytree(ckpt, tmp)
    (tmp / "manifest.json").unlink()
    truncate(tmp / "mp_rank_00_model_states.pt")
    return f"{tmp}: half-written checkpoint"


# (damage of step_4, checkpoint the run must resume from)
CASES = {"truncated_model": (damage_model, "step_2"), "truncated_rng": (damage_rng, "step_2"),
         "flipped_byte": (flip_model, "step_2"), "no_manifest": (no_manifest, "step_2"),
         "garbage_latest": (garbage_latest, "step_4"), "latest_names_missing_dir": (latest_missing_dir, "step_4"),
         "half_written_temp_dir": (half_written_temp_dir, "step_4")}


@pytest.mark.parametrize("case", CASES)
def test_resumes_from_newest_intact_checkpoint_with_a_warning(run_copy, reference, capsys, case):
    damage, expected = CASES[case]
    problem = damage(run_copy / "checkpoints" / "step_4")
    capsys.readouterr()
    result = train(run_copy, "train.max_steps=5")    # the rerun goes one step further
    out, err = capsys.readouterr()
    assert f"warning: {problem}" in err, err[-3000:]
    assert result["resumed"] and f"resumed at step {expected.split('_')[1]}" in out
    # Exact: every logged loss (kept up to the checkpoint, redone after it) is the uninterrupted run's.
    assert logged(run_copy) == pytest.approx(reference, rel=1e-6)
    # Pruning kept the two newest intact checkpoints (step_4 rewritten where it was damaged), no temp dir.
    from pipeline.checkpoint_files import verify

    ckpts = run_copy / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_4", "step_5"]
    assert verify(ckpts / "step_4") == [] and verify(ckpts / "step_5") == []
    assert (ckpts / "latest").read_text() == "step_5"


def test_no_intact_checkpoint_stops_instead_of_restarting(run_copy, capsys):
    """`latest` pointing nowhere and every checkpoint damaged: exit 2 naming the problems; only
    train.resume=false starts over, and it moves the old checkpoints aside instead of mixing runs."""
    from pipeline.train import main

    ckpts = run_copy / "checkpoints"
    truncate(ckpts / "step_4" / "mp_rank_00_model_states.pt")
    shutil.rmtree(ckpts / "step_2")
    (ckpts / "latest").write_text("step_2")
    args = ["--config", str(run_copy / "config.yaml"), f"train.output_dir={run_copy}"]
    log_before = (run_copy / "train_log.jsonl").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint error: {ckpts}: checkpoints exist but none is intact" in err
    assert str(ckpts / "step_4" / "mp_rank_00_model_states.pt") in err and "train.resume=false" in err
    assert (run_copy / "train_log.jsonl").read_text() == log_before        # nothing trained
    (ckpts / "latest").write_text("not a tag")        # garbage latest, no checkpoint dir at all
    shutil.rmtree(ckpts / "step_4")
    assert main(args) == 2 and "none is intact" in capsys.readouterr().err
    assert main([*args, "train.resume=false"]) == 0
    assert "moved to" in capsys.readouterr().err
    assert not json.loads((run_copy / "metrics.json").read_text())["resumed"]
    assert [p.name for p in run_copy.glob("checkpoints.replaced-*/latest")] == ["latest"]


def fake_checkpoint(root: Path, tag: str) -> Path:
    from pipeline.checkpoint_files import write_manifest

    ckpt = root / tag
    ckpt.mkdir(parents=True)
    (ckpt / "weights.bin").write_bytes(bytes(range(256)) * 4)
    write_manifest(ckpt)
    return ckpt


def test_pruning_keeps_the_newest_intact_and_the_best(tmp_path):
    """step_3 is damaged: it neither counts towards save_total_limit nor survives; step_1 is the
    best (mark_best) and survives; step_2 is the newest intact one before step_4."""
    from pipeline.checkpoint import _prune, best_tag, mark_best

    root = tmp_path / "checkpoints"
    for step in range(1, 5):
        fake_checkpoint(root, f"step_{step}")
    truncate(root / "step_3" / "weights.bin")
    mark_best(tmp_path, "step_1")
    assert best_tag(root) == "step_1"
    _prune(root, keep=2, current="step_4")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_1", "step_2", "step_4"]
    with pytest.raises(ValueError, match="step_9"):
        mark_best(tmp_path, "step_9")
    (root / "best").write_text("garbage")
    assert best_tag(root) is None
