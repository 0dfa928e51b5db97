"""Shared fixtures. Heavy ones (Ray, engines, models) are session-scoped so the suite starts each once."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach the hub or wandb servers, also when run without `make test` (which sets these too).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest

from mapoco.cli import compose

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"


compose_config = compose  # the RunConfig `mapoco` would build from these command-line overrides


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop every Ray instance on the machine run first, before the session's own Ray starts."""
    items.sort(key=lambda item: item.get_closest_marker("machine_wide") is None)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from mapoco.models.build import build_tiny_model

    return {name: build_tiny_model(name) for name in ("tiny-qwen", "tiny-llama")}


@pytest.fixture(scope="session")
def talk_models() -> dict[str, Path]:
    """The collaboration testbed's specialists (+ on Qwen2, * on Llama) that know the discussion format."""
    from mapoco.models.build import build_tiny_model

    return {name: build_tiny_model(name) for name in ("talk-add", "talk-mul")}


@pytest.fixture(scope="session")
def conductor_models() -> dict[str, Path]:
    """The conductor demo's models: a tiny conductor and two tiny specialists (+ and *)."""
    from mapoco.models.build import build_tiny_model

    return {name: build_tiny_model(name) for name in ("tiny-conductor", "tiny-add", "tiny-mul")}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session; tests kill only the actors they start."""
    import ray

    # Logical CPUs: tiny actors share 2 cores.
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def learner_pool(ray_session):
    """Learner groups that trainers of the session take and give back (reset for each run, not started again)."""
    from mapoco.training.learner import LearnerPool

    pool = LearnerPool()
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def hetero_team(ray_session, tiny_models):
    """A heterogeneous 2-agent team (Qwen2 + Llama, different tokenizers) with real vLLM engines in Ray actors."""
    from mapoco.rollout.discussion import Team

    cfg = compose_config("team=tiny_hetero")  # dtype auto: float32 on every CPU (mapoco.runtime.precision)
    team = Team(cfg.team, seed=0)
    yield team
    team.shutdown()


@pytest.fixture(scope="session")
def rule_verifier(ray_session):
    from mapoco.config import VerifierConfig
    from mapoco.rollout.verifier import VerifierClient

    client = VerifierClient(VerifierConfig())
    yield client
    client.shutdown()
