"""Malformed data fails fast and clean: `path:line: field …: reason`, exit 2, before torch loads."""
import subprocess
import sys
from pathlib import Path

import pytest

from launch_env import child_env
from pipeline.config import ConfigError, load_config
from pipeline.data import DataFormatError, read_gsm8k_aug
from pipeline.data.sources import SKIPPED_FILE, DataError, read_section

REPO = Path(__file__).resolve().parents[1]
GOOD = "Tom has 3 apples and buys 2 more. How many?||<<3+2=5>> #### 5\n"
BAD_LINE = "a question without the separator <<1+1=2>> #### 2\n"


def _bad_file(tmp_path) -> Path:
    path = tmp_path / "bad_train.txt"
    path.write_text(GOOD + BAD_LINE + GOOD + "q||<<1+1=2>> #### \n")
    return path


def test_malformed_training_file_exits_2_without_traceback_or_torch(tmp_path):
    bad = _bad_file(tmp_path)
    code = ("import sys; from pipeline.train import main; "
            f"rc = main(['data.train.0.path={bad}', 'train.output_dir={tmp_path / 'run'}']); "
            "print('TORCH', 'torch' in sys.modules, 'deepspeed' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"data error: {bad}:2: field 'question': missing '||'" in proc.stderr
    assert "(data.train.0)" in proc.stderr and "Traceback" not in proc.stderr
    assert "TORCH False False" in proc.stdout          # nothing heavy ran before the check
    assert not (tmp_path / "run").exists()


def test_malformed_eval_source_is_checked_too(tmp_path):
    cfg = load_config(None, [f"data.eval=[{{format: gsm8k_aug, path: {_bad_file(tmp_path)}}}]"])
    read_section(cfg, "train")
    with pytest.raises(DataError, match=r"bad_train\.txt:2: field 'question'.*\(data\.eval\.0\)"):
        read_section(cfg, "eval")


def test_skip_writes_the_skipped_lines_to_the_output_dir(tmp_path, tokenizer):
    from pipeline.train import load_examples

    bad = _bad_file(tmp_path)
    out = tmp_path / "run"
    cfg = load_config(None, [f"data.train.0.path={bad}", "data.on_malformed=skip", f"train.output_dir={out}"])
    logs = []
    kept = load_examples(cfg, tokenizer, log=logs.append)
    assert len(kept) == 2
    lines = (out / SKIPPED_FILE).read_text().splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{bad}:2", f"{bad}:4"]
    assert "empty answer" in lines[1]
    assert any("2 malformed records skipped" in m and SKIPPED_FILE in m for m in logs)


def test_data_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train\.0\.path: .* is a directory, not a file.*train\.txt"):
        load_config(None, [f"data.train.0.path={tmp_path}"])
    (tmp_path / "train.txt").write_text(GOOD)           # a directory holding the split's file is fine
    cfg = load_config(None, [f"data.train.0.path={tmp_path}"])
    assert len(read_section(cfg).examples) == 1


def test_a_line_that_is_not_utf8_is_named_and_skippable(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(GOOD.encode() + "Caf\xe9 costs 3||<<3=3>> #### 3\n".encode("latin-1") + GOOD.encode())
    with pytest.raises(DataFormatError, match=r"latin1\.txt:2: not UTF-8"):
        read_gsm8k_aug(path)
    res = read_gsm8k_aug(path, on_malformed="skip")
    assert len(res.examples) == 2 and res.skipped == [f"{tmp_path.name}/latin1.txt:2: not UTF-8 text"]
