"""Checkpoint bookkeeping and the safetensors+JSON state format (no actors)."""

import json

import pytest
import torch

from mapoco.config import ConfigError
from mapoco.training import checkpoint
from mapoco.training.state_io import load_state, save_state


def _complete(out, step):
    tmp = checkpoint.begin(out, step)
    return checkpoint.commit(tmp, {"step": step}, keep=5)


def test_auto_resume_skips_a_checkpoint_interrupted_mid_write(tmp_path):
    _complete(tmp_path, 1)
    done = _complete(tmp_path, 2)
    interrupted = checkpoint.begin(tmp_path, 3)  # the kill landed here: no marker, still .tmp
    (interrupted / "trainer_state.json").write_text(json.dumps({"step": 3}))
    assert checkpoint.resolve_resume("auto", tmp_path) == done
    assert checkpoint.resolve_resume(None, tmp_path) is None


def test_auto_resume_without_checkpoints_starts_fresh(tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path) is None


def test_missing_or_corrupted_resume_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.resume"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)
    done = _complete(tmp_path, 1)
    (done / checkpoint.COMPLETE).unlink()
    with pytest.raises(ConfigError, match="incomplete or corrupted"):
        checkpoint.resolve_resume(str(done), tmp_path)
    done = _complete(tmp_path, 2)
    (done / checkpoint.STATE).write_text("{not json")
    with pytest.raises(ConfigError, match="corrupted"):
        checkpoint.resolve_resume(str(done), tmp_path)


def test_init_from_must_hold_every_trained_policy_before_anything_starts(tmp_path):
    """A phase started from a run of another team fails naming train.init_from, before Ray or any actor starts."""
    from conftest import compose_config

    from mapoco.training.trainer import Trainer

    run = tmp_path / "routing"
    done = _complete(run, 3)
    (checkpoint.agent_dir(done, 0)).mkdir()  # a run that trained agent 0 only
    cfg = compose_config("team=tiny_hetero", f"train.init_from={run}", "logger.wandb.mode=disabled")
    with pytest.raises(ConfigError, match=r"train.init_from.*holds no weights for team.agents\[1\] \(no agent_1/\)"):
        Trainer(cfg, tmp_path / "phase")
    assert not (tmp_path / "phase").exists()
    with pytest.raises(ConfigError, match="train.init_from.*no complete checkpoint"):
        Trainer(compose_config(f"train.init_from={tmp_path}"), tmp_path / "x")  # a folder with no checkpoints


def test_old_checkpoints_are_pruned(tmp_path):
    for step in range(1, 5):
        tmp = checkpoint.begin(tmp_path, step)
        checkpoint.commit(tmp, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_state_round_trips_without_pickle(tmp_path):
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
             "python_rng": {"internal": [1, 2, 3], "gauss": None}}
    save_state(state, tmp_path / "s")
    back = load_state(tmp_path / "s")
    assert back["optimizer"]["state"][0]["exp_avg"].equal(state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert 0 in back["optimizer"]["state"]  # integer keys survive
    assert back["python_rng"] == state["python_rng"]


def test_a_rollout_in_flight_round_trips_without_pickle(tmp_path):
    """The off-policy trainer keeps the next step's rollout in its checkpoint: mapoco's dataclasses (tuple keys,
    frozen nested plans, None, NaN-free floats) come back equal; a class from anywhere else is refused."""
    from mapoco.conductor.workflow import Parsed, Plan, Step
    from mapoco.rollout.discussion import DiscussionResult, Record
    from mapoco.tasks import Problem
    from mapoco.training.trainer import Sampled

    record = Record("q1#0", 1, 2, [5, 6], [7, 8, 9], [-0.5, -1.25, -3.0], "42", "stop", "42", True, None)
    result = DiscussionResult([Problem("q1", "6*7?", "42")], 2, 2, {(0, 1, 1): record},
                              {"generate": 1.5, "verify": 0.25})
    parsed = Parsed(Plan((Step(0, "multiply", False), Step(1, "add", True))))
    save_state({"sampled": Sampled(result, 3), "parsed": parsed}, tmp_path / "pending")
    back = load_state(tmp_path / "pending")
    assert back["sampled"] == Sampled(result, 3) and back["parsed"] == parsed
    assert isinstance(back["parsed"].plan.steps, tuple)

    structure = json.loads((tmp_path / "pending.json").read_text())
    structure["__dict__"][1][1]["__dataclass__"] = "subprocess:Popen"
    (tmp_path / "pending.json").write_text(json.dumps(structure))
    with pytest.raises(TypeError, match="not one of mapoco's dataclasses"):
        load_state(tmp_path / "pending")


def _write_under_file_size_limit(out, queue):
    """In a child process: a kernel file-size limit (RLIMIT_FSIZE) makes the checkpoint's big write fail the way
    a full disk does, with a real OSError from write(2)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(2) instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    def write_agents(folder):
        (folder / "agent_0").mkdir()
        save_state({"weights": torch.zeros(1 << 20)}, folder / "agent_0" / "trainer_rank0")  # 4 MiB

    try:
        checkpoint.write(out, 2, {"step": 2}, keep=2, write_parts=write_agents)
        queue.put(("written", ""))
    except checkpoint.CheckpointError as exc:
        queue.put(("error", str(exc)))


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    import multiprocessing as mp

    done = _complete(tmp_path, 1)
    spawn = mp.get_context("spawn")  # a fresh interpreter: torch's thread pool does not survive a fork
    queue = spawn.Queue()
    child = spawn.Process(target=_write_under_file_size_limit, args=(tmp_path, queue), daemon=True)
    child.start()
    try:
        outcome, message = queue.get(timeout=120)
    finally:
        child.kill()
    assert outcome == "error"
    assert "could not write the step 2 checkpoint" in message and "File too large" in message
    assert f"the last complete checkpoint is {done} and is intact" in message
    assert not list(checkpoint.checkpoints_dir(tmp_path).glob("*.tmp"))  # the partial folder is gone
    assert checkpoint.resolve_resume("auto", tmp_path) == done and checkpoint.is_complete(done)
