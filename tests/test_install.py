"""A non-editable install works away from the source tree: its Hydra configs (conf/) ship as package data and models come
from the user's cache, so `mapoco train` runs from any directory, here on a real pretrained model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fresh_venv(path: Path) -> Path:
    """A new venv that borrows the project venv's third-party packages (no download) but not its editable mapoco:
    a path in a .pth file is searched, its own .pth hooks (the editable finder among them) are not run. No pip of
    its own: the project's pip installs into it (``--python``), building with the borrowed setuptools."""
    venv.EnvBuilder(with_pip=False).create(path)
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin"


def source_copy(path: Path) -> Path:
    """What a clone holds for the package: a build writes its build/ and egg-info next to the sources, so it
    builds from a copy and the checkout stays clean."""
    for name in ("pyproject.toml", "README.md"):
        path.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, path / name)
    for name in ("mapoco", "conf"):  # conf/ ships inside the wheel as mapoco/conf
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    return path


# One step of SmolLM2 playing both seats: one turn, one question, one PPO epoch (a 135M float32 update costs about
# 5 s per answer and epoch on 2 cores).
SMOLLM2_STEP = ["team=smollm2x2", "team.shared_policy=true", "turns=1", "train.batch_questions=1",
                "algorithm.samples_per_question=1", "algorithm.ppo_epochs=1", "train.steps=1", "train.eval_every=0",
                "train.eval_limit=2", "train.save_every=0", "logger.wandb.mode=disabled", "sampling.max_new_tokens=24",
                "team.agents.0.sampling.max_new_tokens=24", "team.agents.1.sampling.max_new_tokens=24",
                "learner.micro_batch_size=4"]


@pytest.mark.slow
def test_pip_install_trains_smollm2_from_another_directory(tmp_path, tiny_models):
    bin_dir = fresh_venv(tmp_path / "venv")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q",
                              "--no-deps", "--no-build-isolation", str(source_copy(tmp_path / "src"))],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run([bin_dir / "python", "-c", "import mapoco; print(mapoco.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), f"imported the source tree, not the install: {where}"

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run([bin_dir / "mapoco", "train", *SMOLLM2_STEP, "output_dir=out"], capture_output=True,
                          text=True, cwd=workdir, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and len(summary["after"]["turn_accuracy"]) == 1
    # One SmolLM2 policy plays both seats: one engine set and one learner group, and the engine samples what the
    # learner holds.
    assert sorted(json.loads((out / "placement.json").read_text())) == ["team.agents[0].engine",
                                                                        "team.agents[0].learner"]
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if "train/agent_0/policy_loss" in line]
    assert math.isfinite(step["train/agent_0/policy_loss"]) and not any(k.startswith("train/agent_1/") for k in step)
    assert step["train/agent_0/logprob_max_diff"] <= step["train/agent_0/logprob_tolerance"]
    # A quiet terminal: tables, progress and where outputs went; vLLM's output is in the run's logs/, one file per actor.
    terminal = (proc.stdout + proc.stderr).splitlines()
    assert len(terminal) < 30 and not any("INFO" in line for line in terminal), "\n".join(terminal)
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["agent0-engine-replica0.log", "agent0-learner-rank0.log", "verifier.log"]
    assert "Resolved architecture" in (out / "logs" / "agent0-engine-replica0.log").read_text()


def test_the_wheel_lists_every_package_and_config_folder():
    """pyproject lists the packages (conf/ is mapped into the wheel as mapoco.conf): every folder of mapoco/ with
    modules, and every folder of conf/, is listed, so none is left out of an install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mapoco").rglob("__init__.py")}
    configs = {"mapoco.conf", *(f"mapoco.conf.{d.name}" for d in (ROOT / "conf").iterdir() if d.is_dir())}
    assert listed == packages | configs
