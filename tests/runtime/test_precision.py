"""The dtype policy (mapoco.runtime.precision) for both CPU variants of this machine kind and for GPUs, on any host."""

import pytest

from mapoco.config import AgentConfig, EngineConfig, LearnerConfig
from mapoco.runtime.precision import (
    LOGPROB_TOLERANCE,
    agent_precision,
    cpu_dtype_warning,
    cpu_flags,
    describe,
    has_native_bf16,
    logprob_tolerance,
)


def agent(engine_dtype: str = "auto", engine_gpus: float = 0, learner_gpus: float = 0) -> AgentConfig:
    return AgentConfig("qwen", "tiny-qwen", engine=EngineConfig(dtype=engine_dtype, num_gpus=engine_gpus),
                       learner=LearnerConfig(num_gpus=learner_gpus))

# Flag lines as /proc/cpuinfo prints them on the two CPUs this machine kind comes with.
AVX2 = "fpu vme de pse tsc msr sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2"
AVX512_BF16 = AVX2 + " avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile"


def _flags(tmp_path, line: str) -> frozenset[str]:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {line}\nbogomips\t: 4000\n\n"
                       f"processor\t: 1\nflags\t\t: {line}\n")
    return cpu_flags(cpuinfo)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    assert has_native_bf16(_flags(tmp_path, AVX512_BF16))
    assert not has_native_bf16(_flags(tmp_path, AVX2))
    assert "avx2" in _flags(tmp_path, AVX2) and "bogomips" not in _flags(tmp_path, AVX2)
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("line", [AVX2, AVX512_BF16], ids=["avx2", "avx512_bf16"])
def test_auto_runs_every_cpu_part_in_float32(tmp_path, line):
    """Same seed, same figures on either CPU: auto never picks bf16 for a CPU part, native bf16 or not."""
    flags = _flags(tmp_path, line)
    plan = agent_precision(agent())
    assert (plan.engine, plan.learner, plan.logprob_tolerance) == ("float32", "float32", LOGPROB_TOLERANCE["float32"])
    lines = describe([agent()], training=True, tolerance=None, flags=flags)
    assert lines == [f"precision: team.agents[0] (qwen) engine float32, learner float32, logprob tolerance 0.01 "
                     f"[CPU: {'native bf16' if has_native_bf16(flags) else 'no native bf16'}]"]


@pytest.mark.parametrize("line", [AVX2, AVX512_BF16], ids=["avx2", "avx512_bf16"])
def test_gpu_parts_run_in_bf16_and_the_tolerance_follows(tmp_path, line):
    """Placement, not the asking host, decides: a GPU engine is bf16 even when the driver's CPU has no bf16."""
    flags = _flags(tmp_path, line)
    plan = agent_precision(agent(engine_gpus=1, learner_gpus=1))
    assert (plan.engine, plan.learner, plan.logprob_tolerance) == ("bfloat16", "bfloat16", 0.5)
    assert not [line for line in describe([agent(engine_gpus=1, learner_gpus=1)], True, None, flags) if line.startswith("note:")]
    mixed = agent_precision(agent(engine_gpus=1))
    assert (mixed.engine, mixed.learner, mixed.logprob_tolerance) == ("bfloat16", "float32", 0.5)


def test_bf16_asked_for_on_a_cpu_is_kept_with_a_note_that_depends_on_the_cpu(tmp_path):
    agents = [agent(engine_dtype="bfloat16")]
    avx2 = describe(agents, True, None, _flags(tmp_path, AVX2))
    native = describe(agents, True, None, _flags(tmp_path, AVX512_BF16))
    assert "engine bfloat16, learner float32, logprob tolerance 0.5" in avx2[0]
    assert "emulated, several times slower" in avx2[1] and "team.agents[0].engine" in avx2[1]
    assert "native bf16: faster, but its logprobs differ" in native[1]
    assert cpu_dtype_warning("engine", "float32", False, _flags(tmp_path, AVX2)) is None
    assert cpu_dtype_warning("engine", "bfloat16", True, _flags(tmp_path, AVX2)) is None  # on a GPU bf16 is native


def test_tolerance_is_set_by_the_coarser_dtype_and_the_config_overrides_it():
    assert logprob_tolerance("float32", "float32") == 0.01
    assert logprob_tolerance("float32", "bfloat16") == logprob_tolerance("bfloat16", "float32") == 0.5
    assert agent_precision(agent(), tolerance=0.2).logprob_tolerance == 0.2


def test_eval_describes_engines_only(tmp_path):
    assert describe([agent()], False, None, _flags(tmp_path, AVX2))[0].endswith("engine float32 [CPU: no native bf16]")


def test_auto_becomes_fp16_on_a_gpu_without_bf16(monkeypatch):
    """Before Ampere (V100, T4) a GPU computes no bf16 and vLLM refuses it: auto's bf16 becomes fp16 there, in the
    actor that knows its device; a dtype the user named stays."""
    import torch

    from mapoco.runtime.precision import on_this_device

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert on_this_device("auto", "bfloat16") == "float16"
    assert on_this_device("bfloat16", "bfloat16") == "bfloat16"
    assert on_this_device("auto", "float32") == "float32"  # a CPU part
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert on_this_device("auto", "bfloat16") == "bfloat16"


def test_fp16_learners_scale_their_loss_and_bf16_ones_do_not():
    import torch

    from mapoco.config import LearnerConfig
    from mapoco.training.policy_model import deepspeed_config

    fp16 = deepspeed_config(LearnerConfig(zero_stage=3), torch.float16)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} and not fp16["bf16"]["enabled"]
    assert fp16["zero_optimization"] == {"stage": 3}
    bf16 = deepspeed_config(LearnerConfig(), torch.bfloat16)
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"]
    f32 = deepspeed_config(LearnerConfig(), torch.float32)
    assert not f32["bf16"]["enabled"] and not f32["fp16"]["enabled"]
