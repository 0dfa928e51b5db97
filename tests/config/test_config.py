import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from conftest import ROOT, compose_config
from hydra.errors import MissingConfigException

from mapoco.config import ConfigError
from mapoco.training.checkpoint import resolve_resume


def test_defaults_compose(tiny_models):
    cfg = compose_config()
    assert cfg.turns == 3 and len(cfg.team.agents) == 2 and cfg.task.name == "arithmetic"
    assert cfg.team.agents[0].sampling.max_new_tokens == 32


def test_agent_keys_override_global_defaults(tiny_models):
    cfg = compose_config("engine.max_model_len=512", "sampling.temperature=0.5")
    assert all(a.engine.max_model_len == 512 and a.sampling.temperature == 0.5 for a in cfg.team.agents)


def _ray_footprint() -> tuple[bool, int]:
    """Whether Ray runs, and how many placement groups it holds (every engine and learner reserves one first)."""
    from ray.util import placement_group_table

    return ray.is_initialized(), len(placement_group_table()) if ray.is_initialized() else 0


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
        ("algorithm.estimator=ppo2", "algorithm.estimator"),
        ("learner.lr=-1e-5", "team.agents[0].learner.lr"),
        ("learner.lr=nan", "team.agents[0].learner.lr"),
        ("algorithm.kl_coef=-0.1", "algorithm.kl_coef"),
        ("algorithm.kl_in_reward=false", "algorithm.kl_estimator"),  # k1 in the loss: zero gradient in expectation
        ("engine.num_cpus=0", "team.agents[0].engine.num_cpus"),
        ("train.resume=/no/such/checkpoint", "train.resume"),
        ("+train.eval_tasks={unseen: {name: bogus}}", "train.eval_tasks.unseen.name"),
        ("+train.eval_tasks={unseen: {name: numbers, split: dev}}", "train.eval_tasks.unseen.split"),
        ("+train.eval_tasks={unseen: {name: numbers, bogus: 1}}", "train.eval_tasks.unseen.bogus"),
    ],
)
def test_bad_config_names_the_key(tiny_models, override, key):
    before = _ray_footprint()  # other test files may have started the session's Ray already
    with pytest.raises(ConfigError) as err:
        cfg = compose_config(override)
        resolve_resume(cfg.train.resume, Path("unused"))  # the trainer's first check, before any actor
    assert err.value.key == key
    assert _ray_footprint() == before  # failed before Ray started or anything was reserved


def test_a_hub_model_not_downloaded_is_checked_when_the_run_fetches_it(tiny_models):
    """Validation fetches nothing (a run that cannot get its GPUs downloads no model); the run's start fetches and
    checks it, once the cluster is known to hold the run: offline, a hub id not in the cache is a config error."""
    from mapoco.config import check_models

    for override, key in (("team.agents.0.model=no-such-org/no-such-model", "team.agents[0].model"),
                          ("verifier.base=no-such-org/no-such-model", "verifier.base")):
        cfg = compose_config(override, "command=train-verifier")
        with pytest.raises(ConfigError, match="could not be fetched from the hub") as err:
            check_models(cfg)
        assert err.value.key == key


@pytest.mark.parametrize(
    "overrides,key,says",
    [
        (["learner.num_learners=2", "train.batch_questions=3", "algorithm.samples_per_question=1", "turns=1"],
         "team.agents[0].learner.num_learners", "must divide the 3 answers per step"),
        (["engine.tensor_parallel_size=2", "engine.num_gpus=1"], "team.agents[0].engine.num_gpus",
         "tensor_parallel_size=2 runs 2 GPU workers"),
        (["learner.colocate=true", "engine.num_gpus=1"], "team.agents[0].learner.colocate",
         "both > 0 (one GPU) or both 0 (CPUs)"),
        (["learner.colocate=true", "engine.num_gpus=0.5", "learner.num_gpus=0.75"], "team.agents[0].learner.num_gpus",
         "engine.num_gpus + learner.num_gpus = 1.25 > 1"),
        (["learner.colocate=true", "engine.num_gpus=0.5", "learner.num_gpus=0.5", "learner.num_learners=2",
          "train.batch_questions=4"], "team.agents[0].learner.num_learners", "set it to engine.replicas=1"),
        (["learner.colocate=true", "engine.num_gpus=0.5", "learner.num_gpus=0.5", "train.off_policy_steps=1"],
         "train.off_policy_steps", "their engines sleep while the learner updates"),
        (["learner.placement=SCATTER"], "team.agents[0].learner.placement", "one of ('PACK', 'SPREAD'"),
        (["engine.resources={node_a: 0}"], "team.agents[0].engine.resources.node_a", "an amount > 0"),
        (["engine.resources={CPU: 2}"], "team.agents[0].engine.resources.CPU", "set engine.num_cpus"),
        (["cluster.placement_timeout_s=0"], "cluster.placement_timeout_s", "seconds > 0"),
    ],
)
def test_bad_placement_arithmetic_names_the_numbers(tiny_models, overrides, key, says):
    with pytest.raises(ConfigError) as err:
        compose_config(*overrides)
    assert err.value.key == key and says in str(err.value)


def test_model_without_chat_template_is_rejected(tiny_models, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_models["tiny-qwen"], plain)
    (plain / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="no chat template") as err:
        compose_config(f"team.agents.0.model={plain}")
    assert err.value.key == "team.agents[0].model"


@pytest.mark.parametrize("pickled", ["pytorch_model.bin", None])
def test_a_model_folder_without_safetensors_is_refused_unloaded(tiny_models, tmp_path, pickled):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["tiny-qwen"], folder)
    (folder / "model.safetensors").unlink()
    if pickled:
        (folder / pickled).write_bytes(b"not to be unpickled")
    with pytest.raises(ConfigError, match="has no safetensors weights") as err:
        compose_config(f"team.agents.0.model={folder}")
    assert err.value.key == "team.agents[0].model"
    assert ("pytorch_model.bin (pickle, refused)" in str(err.value)) == bool(pickled)
    with pytest.raises(ConfigError, match="has no safetensors weights") as err:
        compose_config("verifier=learned", f"verifier.path={folder}")
    assert err.value.key == "verifier.path"


# Choices that need a key the YAML leaves to the user (what its comment says to set).
NEEDS = {("verifier", "learned"): ["verifier.path={trained_verifier}"]}
CONF = ROOT / "conf"
CHOICES = sorted((path.parent.name, path.stem) for path in CONF.glob("*/*.yaml"))


@pytest.mark.parametrize(("group", "name"), CHOICES, ids=[f"{g}={n}" for g, n in CHOICES])
def test_every_yaml_under_conf_composes_and_validates(group, name, tiny_models, conductor_models, talk_models,
                                                      tmp_path):
    """Every experiment, team, task and verifier in conf/ composes into a RunConfig that passes validation as
    written (hub models are named, not fetched: that happens when a run starts)."""
    trained_verifier = tmp_path / "verifier"
    shutil.copytree(tiny_models["tiny-qwen"], trained_verifier)
    choice = f"+experiment={name}" if group == "experiment" else f"{group}={name}"
    extra = [key.format(trained_verifier=trained_verifier) for key in NEEDS.get((group, name), [])]
    cfg = compose_config(choice, *extra)
    if group == "team":
        assert cfg.team.name == name and cfg.team.agents
    elif group == "task":
        assert cfg.task.name
    elif group == "verifier":
        assert cfg.verifier.kind == name


def test_the_conf_tree_is_at_the_top_level():
    assert {group for group, _ in CHOICES} == {"experiment", "task", "team", "verifier"}
    assert (CONF / "config.yaml").is_file()


@pytest.mark.parametrize("group", ["team", "task"])
def test_unknown_team_or_task_is_rejected(group):
    with pytest.raises(MissingConfigException, match=group):
        compose_config(f"{group}=no_such_{group}")


@pytest.mark.parametrize("command", ["eval", "train"])
def test_cli_reports_config_errors_without_starting_ray(tiny_models, tmp_path, command):
    proc = subprocess.run(
        [sys.executable, "-m", "mapoco", command, "turns=0", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "turns=0" in proc.stderr and "must be an integer >= 1" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_cli_reports_an_unwritable_output_dir_without_starting_ray(tiny_models, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "mapoco", "train", f"output_dir={blocker / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert f"config error: output_dir='{blocker / 'run'}': is not a writable directory" in proc.stderr
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


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["method=bogus"], "method"),
        (["+experiment=conductor", "conductor.max_steps=6"], "conductor.max_steps"),
        (["+experiment=conductor", "team.agents.1.trainable=true"], "team.agents[1].trainable"),
        (["+experiment=conductor", "team.agents=[{name: c, model: tiny-conductor}]"], "team.agents"),
        (["+experiment=conductor", "conductor.http_workers=[{name: x, base_url: 'ftp://h', model: m}]"],
         "conductor.http_workers[0].base_url"),
        (["+experiment=conductor", "conductor.http_workers=[{name: x, base_url: 'http://127.0.0.1:9/v1', model: m, "
                                   "api_key_env: MAPOCO_TEST_UNSET_KEY}]"], "conductor.http_workers[0].api_key_env"),
        (["+experiment=conductor", "conductor.min_pool=3"], "conductor.min_pool"),
        (["+experiment=conductor", "conductor.eval_pools=[[adder, divider]]"], "conductor.eval_pools[0][1]"),
        (["+experiment=conductor", "conductor.random_pools=true", "conductor.min_pool=2",
          "conductor.heldout_pools=[[adder, multiplier]]"], "conductor.heldout_pools"),  # no pool of 2 avoids it
        (["+experiment=composition", "conductor.eval_pools=[[adder]]"], "conductor.eval_pools[0]"),  # 2-step workflow
        (["+experiment=pools", "team.agents.2.description='multiplies=fast'"], "team.agents[2].description"),
        (["+experiment=conductor", "+train.eval_tasks={unseen: {name: numbers}}"], "train.eval_tasks.unseen"),
    ],
)
def test_bad_conductor_config_names_the_key(conductor_models, overrides, key):
    with pytest.raises(ConfigError) as err:
        compose_config(*overrides)
    assert err.value.key == key


def test_the_name_lists_config_accepts_match_what_the_code_implements():
    """config.schema owns the names a run may choose; each is implemented, and nothing implemented is unnamed."""
    import torch

    from mapoco.config import schema
    from mapoco.rollout.topology import visible_peers
    from mapoco.training.algorithms import ESTIMATORS, kl_penalty

    assert set(ESTIMATORS) == set(schema.ESTIMATORS)
    seen = {name: tuple(tuple(visible_peers(agent, 4, name)) for agent in range(4)) for name in schema.TOPOLOGIES}
    assert len(set(seen.values())) == len(schema.TOPOLOGIES)  # each name its own map, none the fallback of another
    logprobs = torch.tensor([[0.5, -0.5]])
    values = {name: tuple(kl_penalty(logprobs, torch.zeros_like(logprobs), name).flatten().tolist())
              for name in schema.KL_ESTIMATORS}
    assert len(set(values.values())) == len(schema.KL_ESTIMATORS)
