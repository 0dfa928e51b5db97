"""Shared fixtures. Heavy ones (Ray, engines, models) are session-scoped so the suite starts each once."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Tests never reach the hub or wandb servers, also when run without `make test` (which sets these too).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

from mapoco.cli import compose

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"


compose_config = compose  # the RunConfig `mapoco` would build from these command-line overrides


def readme_block(name: str) -> str:
    """The fenced bash block right after ``<!-- readme-test: name -->`` in README.md."""
    found = re.search(rf"<!-- readme-test: {name} -->\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert found, f"README.md has no block marked readme-test: {name}"
    return found.group(1)


def run_block(block: str, timeout_s: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """A README block as a new user runs it: a fresh shell (`bash --noprofile --norc -e`) with a bare environment
    and an empty ``HOME`` (no ``~/.ray`` token, no caches an earlier run left), only the built models found
    through ``MAPOCO_CACHE`` (a first-time user builds them with `make models`)."""
    from mapoco.models.registry import cache_dir

    with tempfile.TemporaryDirectory(prefix="fresh-home-") as home:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
               "MAPOCO_CACHE": str(cache_dir())}
        return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-c", block], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout_s)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop every Ray instance on the machine run first, before the session's own Ray starts."""
    items.sort(key=lambda item: item.get_closest_marker("machine_wide") is None)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from mapoco.testbed.build import build_tiny_model

    return {name: build_tiny_model(name) for name in ("tiny-qwen", "tiny-llama")}


@pytest.fixture(scope="session")
def talk_models() -> dict[str, Path]:
    """The collaboration testbed's specialists (+ on Qwen2, * on Llama) that know the discussion format, and the
    unseen domain's pair (the same, each also knowing one kind of question about numbers)."""
    from mapoco.testbed.build import build_tiny_model

    return {name: build_tiny_model(name) for name in ("talk-add", "talk-mul", "duo-add", "duo-mul")}


@pytest.fixture(scope="session")
def conductor_models() -> dict[str, Path]:
    """The conductor demo's models: a tiny conductor and two tiny specialists (+ and *)."""
    from mapoco.testbed.build import build_tiny_model

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
    from mapoco.training.learner_group import LearnerPool

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


# PyTorch's non-vectorized float32 kernels: matrix products and reductions sum in another order than this CPU's
# vectorized ones, as a CPU of the other kind (AVX2 / AVX-512) does. A compile cache of their own: one built for this
# CPU's vector ISA does not compile under them.
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default",
                 "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".cache" / "torchinductor-kernels-default")}


@dataclass
class UpdateDirection:
    """What one real update did to the logprobs of the tokens it trained on, beside their advantages: the learner
    group scored the same rows right before and right after it."""

    advantages: torch.Tensor  # [rows, length], zero past each row's end
    change: torch.Tensor  # logprob after - before, same shape
    mask: torch.Tensor

    def mean_change(self, sign: int) -> float:
        """Mean logprob change of the tokens whose advantage has this sign."""
        picked = (self.advantages * sign > 0) & (self.mask > 0)
        return float(self.change[picked].mean())

    def surrogate_gain(self) -> float:
        """Sum of advantage x logprob change over the trained tokens: the policy-gradient objective's first-order
        change, which every update must raise."""
        return float((self.advantages * self.change * self.mask).sum())

    def assert_follows_advantages(self, what: str) -> None:
        """The update's direction on the sampled tokens, which no float32 summation order can flip (the changes are
        orders of magnitude above rounding): the advantage-weighted logprob change, the policy-gradient objective's
        first-order change, is positive. (Not that positive-advantage tokens gain more on average than negative ones:
        a joint update moves mass among tokens, Adam carries earlier batches' directions into later updates, and
        near-certain tokens are many; on an AVX-512 (native bf16) machine a LoRA agent's fourth update had its positive-advantage
        tokens lose 0.044 on average against 0.024 for the negative ones, at an advantage-weighted change of +1.95.)"""
        up, down, gain = self.mean_change(+1), self.mean_change(-1), self.surrogate_gain()
        assert gain > 0, (what, f"advantage-weighted change {gain:+.3g} (positive-advantage tokens {up:+.3g}, "
                                f"negative {down:+.3g})")


@dataclass
class WatchedUpdate:
    """One update as the run's learner group made it and, from the same rows and batch, as its twin on the other
    kernels made it (when the group has one)."""

    native: UpdateDirection
    other_kernels: UpdateDirection | None

    def assert_follows_advantages(self, what: str) -> None:
        """On either kernels, and the two updates agree: another CPU's summation order moves the same tokens the
        same way, to within a small share of the update itself."""
        self.native.assert_follows_advantages(what)
        if self.other_kernels is None:
            return
        self.other_kernels.assert_follows_advantages(f"{what}, other kernels")
        moved = float((self.native.change.abs() * self.native.mask).max())
        apart = float(((self.native.change - self.other_kernels.change).abs() * self.native.mask).max())
        assert apart < 0.1 * moved, (what, f"the kernels' updates differ by {apart:.3g}, the update moved {moved:.3g}")


def kernels_twin(trainer, policy):
    """``policy``'s learner group again, from the same model, settings and seed, its ranks on OTHER_KERNELS."""
    from mapoco.training.learner_group import LearnerGroup

    path, cfg, algo, turns, seed, what = trainer.learner_args(policy.seats[0])
    return LearnerGroup(path, dataclasses.replace(cfg, env={**(cfg.env or {}), **OTHER_KERNELS}), algo, turns, seed,
                        f"{what} (other kernels)")


@contextlib.contextmanager
def watch_updates(group, twin=None) -> Iterator[list[WatchedUpdate]]:
    """Every ``group.update`` inside the block runs as it would (the real learners, the real batch), with the same
    rows scored before and after it; ``twin`` (``kernels_twin``), if given, makes the same update from the same rows
    and batch. The block gets one WatchedUpdate per update. The twin is shut down at the end."""
    seen: list[WatchedUpdate] = []
    real = group.update

    def direction(learners, update, rows, batch, args, kwargs) -> tuple[dict[str, float], UpdateDirection]:
        before = learners.rollout_stats(rows).logprobs
        metrics = update(rows, batch, *args, **kwargs)
        lengths = torch.tensor([len(r.response_ids) for r in rows])
        mask = (torch.arange(before.size(1)) < lengths[:, None]).float()
        return metrics, UpdateDirection(batch.advantages, learners.rollout_stats(rows).logprobs - before, mask)

    def update(rows, batch, *args, **kwargs):
        metrics, native = direction(group, real, rows, batch, args, kwargs)
        other = direction(twin, twin.update, rows, batch, args, kwargs)[1] if twin is not None else None
        seen.append(WatchedUpdate(native, other))
        return metrics

    group.update = update
    try:
        yield seen
    finally:
        del group.update  # the class's method again (pooled groups outlive the test)
        if twin is not None:
            twin.shutdown()
