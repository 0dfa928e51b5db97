"""Which dtype each part of a run computes in, and how far engine and learner logprobs may then differ.

The policy for ``dtype: auto`` (README, "Precision"):

| part | GPU | CPU with native bf16 (AVX-512 BF16, AMX) | CPU without (AVX2) |
|---|---|---|---|
| engine weights and activations | bf16 | float32 | float32 |
| learner weights (and DeepSpeed's optimizer state) | bf16 (fp32 master copy) | float32 | float32 |
| logprobs in the PPO ratio, KL and the drift check | float32 | float32 | float32 |

Why float32 on *every* CPU: without native bf16, bf16 is emulated and several times slower (SmolLM2-135M engine
96 vs 22 tok/s); with it, bf16 engines and learners disagree by 0.05-0.28 in logprob on tiny models (float32: 0),
which turns the PPO ratio off-policy, and the same seed gives other figures than on an AVX2 machine. The decision
depends on where a part runs (its config's ``num_gpus``), not on the host that asks, so the driver and the actors
agree on a multi-node cluster whatever hardware the driver has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mapoco.config import AgentConfig, EngineConfig, LearnerConfig

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
HALF_DTYPES = frozenset({"bfloat16", "float16"})

# Largest |engine - learner| logprob on a sampled token that still means "same weights", by the coarser dtype of
# the two. float32: vLLM's and HF's kernels sum in different orders (measured max 2e-4 on tiny models and SmolLM2,
# tests/training/test_train.py); a stale or wrong weight push shows 0.1-0.9. Half precision: 0.05-0.28 measured on tiny
# models with both sides in bf16, so only gross drift can be told from rounding there.
LOGPROB_TOLERANCE = {"float32": 0.01, "bfloat16": 0.5, "float16": 0.5}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_native_bf16(flags: frozenset[str]) -> bool:
    return bool(flags & NATIVE_BF16_FLAGS)


def pick_dtype(requested: str, on_gpu: bool) -> str:
    """A config dtype ("auto" or a torch dtype name) for a part placed on a GPU or not -> the dtype it runs in."""
    if requested != "auto":
        return requested
    return "bfloat16" if on_gpu else "float32"


def cpu_dtype_warning(part: str, dtype: str, on_gpu: bool, flags: frozenset[str]) -> str | None:
    """A note for a half-precision part on a CPU: slow where bf16 is emulated, and never bitwise like float32."""
    if on_gpu or dtype not in HALF_DTYPES:
        return None
    if has_native_bf16(flags):
        return (f"{part} runs in {dtype} on a CPU with native bf16: faster, but its logprobs differ from float32 by "
                f"up to ~0.3 and its figures from an AVX2 machine's (auto picks float32 on every CPU)")
    return (f"{part} runs in {dtype} on a CPU without native bf16 (no avx512_bf16/amx_bf16): emulated, several "
            f"times slower than float32 (auto picks float32 on every CPU)")


def logprob_tolerance(engine: str, learner: str) -> float:
    """The engine-vs-learner gap a run (and a test) accepts, set by the coarser of the two dtypes."""
    return max(LOGPROB_TOLERANCE[engine], LOGPROB_TOLERANCE[learner])


def engine_dtype(cfg: EngineConfig) -> str:
    return pick_dtype(cfg.dtype, cfg.num_gpus > 0)


def on_this_device(requested: str, planned: str) -> str:
    """The dtype an actor runs in, decided where its device is known: ``auto``'s bf16 becomes fp16 on a GPU that
    does not compute bf16 (before Ampere: V100, T4), where vLLM refuses bf16. Either half dtype keeps the same
    logprob tolerance, so the driver's plan stands."""
    import torch

    if requested == "auto" and planned == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "float16"
    return planned


def learner_dtype(cfg: LearnerConfig) -> str:
    return pick_dtype(cfg.dtype, cfg.num_gpus > 0)


@dataclass(frozen=True)
class AgentPrecision:
    engine: str
    learner: str
    logprob_tolerance: float  # the engine-vs-learner gap this agent's drift check accepts


def agent_precision(agent: AgentConfig, tolerance: float | None = None) -> AgentPrecision:
    """What one agent's engines and learners run in; ``tolerance`` (train.logprob_tolerance) overrides the gap
    the dtypes allow."""
    engine, learner = engine_dtype(agent.engine), learner_dtype(agent.learner)
    return AgentPrecision(engine, learner, tolerance if tolerance is not None else logprob_tolerance(engine, learner))


def describe(agents: list[AgentConfig], training: bool, tolerance: float | None,
             flags: frozenset[str]) -> list[str]:
    """The run's precision for its terminal: one line of dtypes per agent, then a note on every half-precision
    part placed on a CPU (slow where bf16 is emulated; never bitwise like float32)."""
    cpu = "native bf16" if has_native_bf16(flags) else "no native bf16"
    lines = []
    for i, agent in enumerate(agents):
        plan = agent_precision(agent, tolerance)
        learner = f", learner {plan.learner}, logprob tolerance {plan.logprob_tolerance:g}" if (
            training and agent.trainable) else ""
        lines.append(f"precision: team.agents[{i}] ({agent.name}) engine {plan.engine}{learner} [CPU: {cpu}]")
        parts = [("engine", plan.engine, agent.engine)]
        parts += [("learner", plan.learner, agent.learner)] if training and agent.trainable else []
        for part, dtype, cfg in parts:
            note = cpu_dtype_warning(f"team.agents[{i}].{part}", dtype, cfg.num_gpus > 0, flags)
            lines += [f"note: {note}"] if note else []
    return lines
