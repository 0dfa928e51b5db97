import subprocess
import sys

import pytest
import ray
from hydra.errors import MissingConfigException

from mapoco.config import ConfigError

from conftest import compose_config


def test_defaults_compose(tiny_models):
    cfg = compose_config()
    assert cfg.turns == 3 and len(cfg.team.agents) == 2 and cfg.task.name == "arithmetic"
    assert cfg.team.agents[0].sampling.max_new_tokens == 32


def test_agent_keys_override_global_defaults(tiny_models):
    cfg = compose_config("engine.max_model_len=512", "sampling.temperature=0.5")
    assert all(a.engine.max_model_len == 512 and a.sampling.temperature == 0.5 for a in cfg.team.agents)


@pytest.mark.parametrize(
    "override,key",
    [
        ("turns=0", "turns"),
        ("rewards.gamma=-1", "rewards.gamma"),
        ("rewards.alpha0=nan", "rewards.alpha0"),
        ("rewards.incentives=bogus", "rewards.incentives"),
        ("discussion.topology=mesh", "discussion.topology"),
        ("sampling.max_new_tokens=0", "team.agents[0].sampling.max_new_tokens"),
        ("team.agents=[]", "team.agents"),
        ("team.agents.0.model=/no/such/model", "team.agents[0].model"),
        ("+engine.bogus=1", "team.agents[0].engine.bogus"),
        ("verifier=learned", "verifier.path"),
    ],
)
def test_bad_config_names_the_key(tiny_models, override, key):
    with pytest.raises(ConfigError) as err:
        compose_config(override)
    assert err.value.key == key
    assert not ray.is_initialized()  # failed before any actor could start


def test_unknown_team_is_rejected():
    with pytest.raises(MissingConfigException, match="team"):
        compose_config("team=no_such_team")


@pytest.mark.parametrize("command", ["eval", "train"])
def test_cli_reports_config_errors_without_starting_ray(tiny_models, tmp_path, command):
    proc = subprocess.run(
        [sys.executable, "-m", "mapoco", command, "turns=0", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "turns=0" in proc.stderr and "must be an integer >= 1" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_cli_reports_unusable_data_without_starting_ray(tiny_models, tmp_path):
    data = tmp_path / "anli_rows.jsonl"
    data.write_text('{"premise": "P", "hypothesis": "H", "label": 0}\n')  # no gsm8k fields
    proc = subprocess.run(
        [sys.executable, "-m", "mapoco", "train", "task=gsm8k", f"task.path={data}", f"task.train_path={data}",
         f"output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert f"data error: task.path={data}: no usable gsm8k problem" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
