"""Every config key has a bad value that `config.validate` rejects, naming the key, before anything is created."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, compose_config

from mapoco.config import ConfigError, RunConfig, check_writable_dir
from mapoco.tasks import TASK_PARAMS, TASK_SPLITS, task_names


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted keys of every leaf of a config dataclass tree; a list of configs by its first entry ([0])."""
    hints, keys = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        key, typ = f"{prefix}{f.name}", hints[f.name]
        item = typing.get_args(typ)[0] if typing.get_origin(typ) is list else None
        if dataclasses.is_dataclass(item):
            keys += leaf_keys(item, f"{key}[0].")
        elif dataclasses.is_dataclass(typ):
            keys += leaf_keys(typ, f"{key}.")
        else:
            keys.append(key)
    return keys


CONDUCTOR = "+experiment=conductor"  # conductor_tiny: the conductor and two local workers, adder and multiplier


def fixed_workflow(**fields: str) -> str:
    entry = {"model_id": "[0, 1]", "subtasks": "[Solve., Check.]", "access_list": "[[], [all]]", **fields}
    return "conductor.fixed_workflows=[{" + ", ".join(f"{k}: {v}" for k, v in entry.items()) + "}]"


def http_worker(**fields: str) -> str:
    entry = {"name": "remote", "base_url": "'http://127.0.0.1:9/v1'", "model": "m", **fields}
    return "conductor.http_workers=[{" + ", ".join(f"{k}: {v}" for k, v in entry.items()) + "}]"


# key -> overrides that give it a bad value. Booleans have no bad value but a non-boolean (`maybe`), unless a
# combination makes one wrong. Agent keys are set through the top-level engine/sampling/learner defaults.
BAD: dict[str, str | tuple[str, ...]] = {
    "command": "command=bogus",
    "method": "method=bogus",
    "seed": "seed=-1",
    "turns": "turns=0",
    "output_dir": "output_dir=/proc/mapoco-run",
    "checkpoint": "checkpoint=/no/such/run",
    "task.name": "task.name=bogus",
    "task.split": "task.split=dev",  # arithmetic has train, validation and test
    "task.limit": "task.limit=0",
    "task.path": ("task=gsm8k", "task.path=/no/such/file.jsonl"),
    "task.train_path": ("task=gsm8k", "task.train_path=/no/such/file.jsonl"),
    "task.hub": ("task=gsm8k", "task.hub='not a hub id'"),
    "task.hub_config": ("task=gsm8k", "task.hub_config=''"),
    "task.seed": "task.seed=-1",
    "task.params": "+task.params.digits=3",
    "team.name": "team.name=''",
    "team.agents[0].name": "team.agents.0.name=' '",
    "team.agents[0].model": "team.agents.0.model=/no/such/model",
    "team.agents[0].trainable": ("command=train", "team=tiny1", "+team.agents.0.trainable=false"),
    "team.agents[0].adapter": "+team.agents.0.adapter=/no/such/adapter",  # only on the shared LoRA engine
    "team.agents[0].price.per_call": "+team.agents.0.price.per_call=-1",
    "team.agents[0].price.per_token": "+team.agents.0.price.per_token=nan",
    "team.agents[0].description": "+team.agents.0.description='adds, fast'",
    "team.agents[0].fail_rate": "+team.agents.0.fail_rate=1.5",
    "team.agents[0].engine.replicas": "engine.replicas=0",
    "team.agents[0].engine.max_loras": "engine.max_loras=-1",
    "team.agents[0].engine.max_lora_rank": "engine.max_lora_rank=7",  # vLLM offers 1, 8, 16, ...
    "team.agents[0].engine.dtype": "engine.dtype=fp8",
    "team.agents[0].engine.max_model_len": "engine.max_model_len=32",
    "team.agents[0].engine.kv_cache_gib": "engine.kv_cache_gib=0",
    "team.agents[0].engine.gpu_memory_utilization": "engine.gpu_memory_utilization=1.5",
    "team.agents[0].engine.tensor_parallel_size": "engine.tensor_parallel_size=0",
    "team.agents[0].engine.enable_prefix_caching": "engine.enable_prefix_caching=maybe",
    "team.agents[0].engine.enforce_eager": "engine.enforce_eager=maybe",
    "team.agents[0].engine.num_cpus": "engine.num_cpus=-1",
    "team.agents[0].engine.num_gpus": "engine.num_gpus=-1",
    "team.agents[0].engine.resources": "engine.resources={node_a: 0}",
    "team.agents[0].engine.placement": "engine.placement=SCATTER",
    "team.agents[0].sampling.temperature": "sampling.temperature=-0.5",
    "team.agents[0].sampling.top_p": "sampling.top_p=0",
    "team.agents[0].sampling.max_new_tokens": "sampling.max_new_tokens=0",
    "team.agents[0].sampling.stop": "+sampling.stop=['']",
    "team.agents[0].learner.num_learners": "learner.num_learners=0",
    "team.agents[0].learner.zero_stage": "learner.zero_stage=4",
    "team.agents[0].learner.lr": "learner.lr=0",
    "team.agents[0].learner.weight_decay": "learner.weight_decay=-0.1",
    "team.agents[0].learner.warmup_steps": "learner.warmup_steps=-1",
    "team.agents[0].learner.micro_batch_size": "learner.micro_batch_size=0",
    "team.agents[0].learner.max_grad_norm": "learner.max_grad_norm=0",
    "team.agents[0].learner.lora_rank": "learner.lora_rank=-1",
    "team.agents[0].learner.lora_alpha": "learner.lora_alpha=0",
    "team.agents[0].learner.dtype": "learner.dtype=fp8",
    "team.agents[0].learner.num_cpus": "learner.num_cpus=-1",
    "team.agents[0].learner.num_gpus": "learner.num_gpus=-1",
    "team.agents[0].learner.resources": "learner.resources={node_a: -1}",
    "team.agents[0].learner.env": "learner.env={NCCL_DEBUG: 1}",  # a number, not a string
    "team.agents[0].engine.env": "engine.env={CUDA_VISIBLE_DEVICES: '0'}",  # mapoco's own
    "team.agents[0].learner.placement": "learner.placement=SCATTER",
    "team.agents[0].learner.colocate": ("learner.colocate=true", "engine.num_gpus=1"),  # a GPU engine, a CPU learner
    "team.shared_policy": ("team=tiny_hetero", "team.shared_policy=true"),  # two models cannot be one policy
    "team.lora_engine": "team.lora_engine=true",  # no agent trains LoRA
    "algorithm.estimator": "algorithm.estimator=ppo2",
    "algorithm.samples_per_question": "algorithm.samples_per_question=0",
    "algorithm.gamma": "algorithm.gamma=1.5",
    "algorithm.lam": "algorithm.lam=-0.1",
    "algorithm.kl_coef": "algorithm.kl_coef=-0.1",
    "algorithm.kl_estimator": "algorithm.kl_estimator=k4",
    "algorithm.kl_in_reward": "algorithm.kl_in_reward=maybe",
    "algorithm.whiten_advantages": "algorithm.whiten_advantages=maybe",
    "algorithm.scale_by_std": "algorithm.scale_by_std=maybe",
    "algorithm.ppo_epochs": "algorithm.ppo_epochs=0",
    "algorithm.mini_batches": "algorithm.mini_batches=0",
    "algorithm.clip_eps": "algorithm.clip_eps=1.5",
    "algorithm.value_clip_eps": "algorithm.value_clip_eps=0",
    "algorithm.vf_coef": "algorithm.vf_coef=-1",
    "algorithm.entropy_coef": "algorithm.entropy_coef=-1",
    "train.steps": "train.steps=0",
    "train.batch_questions": "train.batch_questions=0",
    "train.eval_every": "train.eval_every=-1",
    "train.eval_limit": "train.eval_limit=0",
    "train.save_every": "train.save_every=-1",
    "train.keep_checkpoints": "train.keep_checkpoints=0",
    "train.resume": "train.resume=/no/such/checkpoint",
    "train.init_from": "train.init_from=/no/such/run",
    "train.logprob_tolerance": "train.logprob_tolerance=0",
    "train.logprob_breach_steps": "train.logprob_breach_steps=0",
    "train.on_logprob_breach": "train.on_logprob_breach=ignore",
    "train.concurrent_policies": "train.concurrent_policies=maybe",
    "train.off_policy_steps": "train.off_policy_steps=2",
    "train.is_weight_cap": "train.is_weight_cap=0.5",
    "train.eval_tasks": "+train.eval_tasks={unseen: {name: numbers, params: {kinds: [odd]}}}",
    "train.weight_sync": "train.weight_sync=gloo",
    "train.sync_timeout_s": "train.sync_timeout_s=0",
    "discussion.topology": "discussion.topology=mesh",
    "discussion.show_scores": "discussion.show_scores=maybe",
    "discussion.batch_size": "discussion.batch_size=0",
    "conductor.http_workers[0].name": (CONDUCTOR, http_worker(name="adder")),  # a local worker's name
    "conductor.http_workers[0].base_url": (CONDUCTOR, http_worker(base_url="'ftp://h'")),
    "conductor.http_workers[0].model": (CONDUCTOR, http_worker(model="''")),
    "conductor.http_workers[0].api_key_env": (CONDUCTOR, http_worker(api_key_env="MAPOCO_TEST_UNSET_KEY")),
    "conductor.http_workers[0].timeout_s": (CONDUCTOR, http_worker(timeout_s="0")),
    "conductor.http_workers[0].max_tokens": (CONDUCTOR, http_worker(max_tokens="0")),
    "conductor.http_workers[0].temperature": (CONDUCTOR, http_worker(temperature="-1")),
    "conductor.http_workers[0].concurrency": (CONDUCTOR, http_worker(concurrency="0")),
    "conductor.http_workers[0].price.per_call": (CONDUCTOR, http_worker(price="{per_call: -0.5}")),
    "conductor.http_workers[0].price.per_token": (CONDUCTOR, http_worker(price="{per_token: inf}")),
    "conductor.http_workers[0].description": (CONDUCTOR, http_worker(description="'adds; fast'")),
    "conductor.cost_weight": (CONDUCTOR, "conductor.cost_weight=0.5"),  # every worker is free: nothing to weigh
    "conductor.cost_scale": (CONDUCTOR, "conductor.cost_scale=-1"),
    "conductor.max_steps": (CONDUCTOR, "conductor.max_steps=6"),
    "conductor.random_pools": "conductor.random_pools=maybe",
    "conductor.min_pool": (CONDUCTOR, "conductor.min_pool=3"),  # more than the two workers
    "conductor.pool_ids": (CONDUCTOR, "conductor.pool_ids=ordinal"),
    "conductor.heldout_pools": (CONDUCTOR, "conductor.heldout_pools=[[adder]]"),  # without random_pools
    "conductor.eval_pools": (CONDUCTOR, "conductor.eval_pools=[[adder, adder]]"),
    "conductor.self_worker": "conductor.self_worker=maybe",
    "conductor.max_depth": (CONDUCTOR, "conductor.max_depth=0"),
    "conductor.max_rounds": (CONDUCTOR, "conductor.max_rounds=0"),
    "conductor.replan_reward": (CONDUCTOR, "conductor.replan_reward=final"),
    "conductor.examples": (CONDUCTOR, "conductor.examples=['']"),
    "conductor.baselines": "conductor.baselines=maybe",
    "conductor.fixed_workflows[0].model_id": (CONDUCTOR, fixed_workflow(model_id="[0, 2]")),  # two workers
    "conductor.fixed_workflows[0].subtasks": (CONDUCTOR, fixed_workflow(subtasks="[Solve.]")),  # one for two steps
    "conductor.fixed_workflows[0].access_list": (CONDUCTOR, fixed_workflow(access_list="[[], [some]]")),
    "verifier.kind": "verifier.kind=bogus",
    "verifier.path": "verifier=learned",  # without a path
    "verifier.timeout_s": "verifier.timeout_s=0",
    "verifier.workers": "verifier.workers=0",
    "verifier.batch_size": "verifier.batch_size=0",
    "verifier.num_cpus": "verifier.num_cpus=0",
    "verifier.base": ("command=train-verifier", "verifier.base=/no/such/model"),  # a hub id: checked when fetched
    "verifier.epochs": "verifier.epochs=0",
    "verifier.lr": "verifier.lr=0",
    "verifier.train_batch_size": "verifier.train_batch_size=0",
    "verifier.held_out": "verifier.held_out=1.0",
    "rewards.gamma": "rewards.gamma=1.5",
    "rewards.incentives": "rewards.incentives=bogus",
    "rewards.alpha0": "rewards.alpha0=-1",
    "rewards.alpha1": "rewards.alpha1=-1",
    "rewards.beta0": "rewards.beta0=-1",
    "rewards.beta1": "rewards.beta1=-1",
    "cluster.address": "cluster.address=bogus",
    "cluster.num_cpus": "cluster.num_cpus=0",
    "cluster.dashboard_host": "cluster.dashboard_host=' '",
    "cluster.placement_timeout_s": "cluster.placement_timeout_s=0",
    "cluster.gpu_memory_gib": "cluster.gpu_memory_gib=0",
    "logger.wandb.mode": "logger.wandb.mode=sync",
    "logger.wandb.project": "logger.wandb.project=a/b",
    "logger.wandb.group": "logger.wandb.group=''",
    "logger.wandb.name": "logger.wandb.name=''",
    "logger.show_logs": "logger.show_logs=maybe",
    "serve.host": "serve.host=' '",
    "serve.port": "serve.port=70000",
    "serve.route_prefix": "serve.route_prefix=api",
    "serve.model_name": "serve.model_name=''",
    "serve.replicas": "serve.replicas=0",
    "serve.num_cpus": "serve.num_cpus=-1",
    "serve.max_batch_size": "serve.max_batch_size=0",
    "serve.batch_wait_timeout_s": "serve.batch_wait_timeout_s=-1",
    "serve.api_key_env": "serve.api_key_env=not-a-name",
    "serve.max_input_chars": "serve.max_input_chars=0",
}
# key -> why no value of it is wrong. Empty: every key has one; a new key goes into BAD, or here with its reason.
EXEMPT: dict[str, str] = {}


def names_the_key(error: ConfigError, key: str) -> bool:
    """The key itself, or one of its entries (a mapping's or a list's)."""
    return error.key == key or error.key.startswith((f"{key}.", f"{key}["))


def test_every_config_key_has_a_bad_value():
    keys = leaf_keys(RunConfig)
    assert len(keys) == len(set(keys))
    assert set(BAD) | set(EXEMPT) == set(keys), "a new config key needs a bad value in BAD (or a reason in EXEMPT)"
    assert not set(BAD) & set(EXEMPT)


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_is_rejected_naming_the_key(tiny_models, conductor_models, key):
    overrides = BAD[key] if isinstance(BAD[key], tuple) else (BAD[key],)
    with pytest.raises(ConfigError) as err:
        compose_config(*overrides)
    assert names_the_key(err.value, key), f"{overrides} -> {err.value}"


@pytest.mark.parametrize(
    "overrides,key,says",
    [
        (["team.agents.1.name=qwen_a"], "team.agents[1].name", "team.agents[0].name has it too"),
        (["sampling.max_new_tokens=1024"], "team.agents[0].sampling.max_new_tokens", "engine.max_model_len=1024"),
        (["task.params.max_terms=1"], "task.params.max_terms", ">= task.params.min_terms=2"),
        (["task.params.operators=[+, '%']"], "task.params.operators", "a non-empty list of +, -, *, /"),
        (["task=anli", "task.params.round=4"], "task.params.round", "one of (1, 2, 3)"),
        (["task=anli", "+task.params.operators=[+]"], "task.params.operators", "allowed: round"),
        (["task=tinygsm", "task.split=test"], "task.split", "one of ('train',)"),
        (["sampling.temperature=inf"], "team.agents[0].sampling.temperature", "a finite number"),
        (["cluster.address=ray://head"], "cluster.address", "HOST:PORT"),
        (["cluster.address=head:70000"], "cluster.address", "HOST:PORT"),
    ],
)
def test_meaning_based_ranges_say_what_is_allowed(tiny_models, overrides, key, says):
    with pytest.raises(ConfigError) as err:
        compose_config(*overrides)
    assert err.value.key == key and says in str(err.value)


@pytest.mark.parametrize("address", ["auto", "local", "127.0.0.1:6379", "ray://head:10001"])
def test_ray_addresses_are_accepted(tiny_models, address):
    assert compose_config(f"cluster.address={address}").cluster.address == address


def test_every_task_has_its_splits_and_params():
    assert set(TASK_SPLITS) == set(TASK_PARAMS) == set(task_names())


# ---------------------------------------------------------------- output directories
@pytest.mark.parametrize("blocked", ["run", "run/deeper"])
def test_a_file_in_the_way_of_the_output_dir(tmp_path, blocked):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(ConfigError, match="is not a directory") as err:
        check_writable_dir("output_dir", tmp_path / blocked)
    assert err.value.key == "output_dir" and (tmp_path / "run").is_file()


@pytest.mark.skipif(not Path("/proc/self/mounts").is_file(), reason="no /proc/self/mounts (not Linux)")
@pytest.mark.parametrize("path", ["/proc/mapoco-run", "/proc/self/mapoco-run", "/sys/mapoco-run/deeper"])
def test_an_output_dir_on_a_virtual_filesystem(path):
    with pytest.raises(ConfigError, match="is on a virtual filesystem"):
        check_writable_dir("output_dir", path)
    assert not Path(path).exists()


def test_an_output_dir_on_a_read_only_filesystem(tmp_path, monkeypatch):
    """Read-only by the filesystem's mount flag, whoever runs the test (root passes every permission check)."""
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(ConfigError, match="is on a read-only filesystem"):
        check_writable_dir("output_dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_output_dir_under_an_unwritable_directory(tmp_path, monkeypatch):
    """Unwritable by permissions, as the process sees it (os.access: root passes a chmod, so the answer is set)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(ConfigError, match="is not writable"):
        check_writable_dir("output_dir", locked / "run")
    assert not (locked / "run").exists()


def test_a_usable_output_dir_passes_and_nothing_is_created(tmp_path):
    check_writable_dir("output_dir", tmp_path / "a" / "b")
    check_writable_dir("output_dir", tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize("output_dir,bad", [("{tmp}/run", "algorithm.gamma=1.5"), ("/proc/mapoco-run", None)])
def test_the_cli_says_one_line_and_creates_nothing(tiny_models, tmp_path, output_dir, bad):
    """A bad value of any key: exit code 2, one line, no traceback, and no run directory (Hydra makes it)."""
    overrides = [f"output_dir={output_dir.format(tmp=tmp_path)}", *([bad] if bad else [])]
    proc = subprocess.run([sys.executable, "-m", "mapoco", "eval", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"config error: {overrides[-1].split('=')[0]}=")
    assert list(tmp_path.iterdir()) == [] and not Path("/proc/mapoco-run").exists()
