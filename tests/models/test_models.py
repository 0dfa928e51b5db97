"""Model builds: tokenizers and chat templates, special-token ids, idempotent/atomic builds, warm-start accuracy.

The tiny models are built once into the cache (``make models``); the session fixture is a no-op after that.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from mapoco.conductor.workflow import SUBTASKS, parse_workflow
from mapoco.models import registry, specs
from mapoco.rollout.prompts import PeerAnswer, first_turn_message, later_turn_message
from mapoco.tasks import Problem, TaskConfig, arithmetic_problems, composition_problems, number_problems
from mapoco.testbed import build, cache, chat_data, probes

TINY = sorted(specs.TINY_MODELS)
DISCUSSION = ["tiny-llama", "tiny-qwen"]  # warm-started on the default task, for discussions
CHATML_PROMPT = "<|im_start|>assistant\n"
GENERATION_PROMPT = {n: "<|assistant|>\n" if specs.TINY_MODELS[n].architecture == "llama" else CHATML_PROMPT
                     for n in TINY}
VLLM_CPU_HEAD_DIMS = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


@pytest.fixture(scope="session")
def tiny_dirs() -> dict[str, Path]:
    return {name: build.build_tiny_model(name) for name in TINY}


@pytest.fixture(scope="session")
def problem():
    return arithmetic_problems(TaskConfig(), "test", 1)[0]


@pytest.mark.parametrize("name", TINY)
def test_tokenizer_round_trip(tiny_dirs, problem, name):
    tok = AutoTokenizer.from_pretrained(tiny_dirs[name])
    text = later_turn_message(problem, [PeerAnswer(agent=1, text="\\boxed{-79}", score=1.0)])
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("name", TINY)
def test_chat_template_ends_with_generation_prompt(tiny_dirs, problem, name):
    tok = AutoTokenizer.from_pretrained(tiny_dirs[name])
    messages = [{"role": "user", "content": first_turn_message(problem)}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith(GENERATION_PROMPT[name]) and not text.endswith(" ")
    assert first_turn_message(problem) + tok.eos_token in text  # a finished turn ends with the stop token
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith(GENERATION_PROMPT[name])


@pytest.mark.parametrize("name", TINY)
def test_special_token_ids_agree(tiny_dirs, name):
    tok = AutoTokenizer.from_pretrained(tiny_dirs[name])
    config = AutoConfig.from_pretrained(tiny_dirs[name])
    generation = GenerationConfig.from_pretrained(tiny_dirs[name])
    assert tok.eos_token_id == config.eos_token_id == generation.eos_token_id
    assert tok.pad_token_id == config.pad_token_id == generation.pad_token_id
    assert config.bos_token_id == generation.bos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id  # padding must never read as end of turn
    assert config.vocab_size == len(tok)
    assert config.max_position_embeddings == 1024


@pytest.mark.parametrize("name", TINY)
def test_head_dim_supported_by_vllm_cpu(tiny_dirs, name):
    config = AutoConfig.from_pretrained(tiny_dirs[name])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert head_dim == specs.TINY_MODELS[name].head_dim
    assert head_dim in VLLM_CPU_HEAD_DIMS


def test_tiny_models_are_heterogeneous(tiny_dirs, problem):
    qwen, llama = (AutoTokenizer.from_pretrained(tiny_dirs[n]) for n in ("tiny-qwen", "tiny-llama"))
    assert qwen.get_vocab() != llama.get_vocab()
    assert qwen.eos_token != llama.eos_token
    text = first_turn_message(problem)
    assert qwen.encode(text, add_special_tokens=False) != llama.encode(text, add_special_tokens=False)
    types = {AutoConfig.from_pretrained(tiny_dirs[n]).model_type for n in TINY}
    assert types == {"qwen2", "llama"}


def test_build_is_idempotent(tiny_dirs, monkeypatch):
    """A complete, current build is reused: nothing is built again and the marker is untouched."""
    marker = tiny_dirs["tiny-qwen"] / registry.MARKER
    before = marker.stat().st_mtime_ns

    def rebuilt(*_):
        raise AssertionError("a complete model was built again")

    monkeypatch.setattr(build, "_build_tiny", rebuilt)
    assert build.build_tiny_model("tiny-qwen") == tiny_dirs["tiny-qwen"]
    assert marker.stat().st_mtime_ns == before


def test_safetensors_weights(tiny_dirs):
    for path in tiny_dirs.values():
        assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))


def test_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "models" / "broken"

    def broken_build(out: Path) -> dict:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cache.atomic_build(final, "fp", broken_build, force=False)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_resolve_model(tiny_dirs, tmp_path, monkeypatch):
    assert registry.resolve_model("tiny-llama") == tiny_dirs["tiny-llama"]
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert registry.resolve_model(str(tmp_path)) == tmp_path  # a local folder of safetensors weights
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        registry.resolve_model("no-such-model")
    monkeypatch.delenv("MAPOCO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the user's cache, as the HF hub's
    assert registry.cache_dir() == tmp_path / "xdg" / "mapoco"
    monkeypatch.setenv("MAPOCO_CACHE", str(tmp_path / "empty"))
    assert registry.cache_dir() == tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match=r"model 'tiny-qwen' is not built; run `make models`"):
        registry.resolve_model("tiny-qwen")


def test_a_hub_model_is_loaded_from_the_hf_cache_of_the_node_an_actor_runs_on(tiny_dirs, tmp_path, monkeypatch):
    """Actors get a hub id, not the driver's snapshot path (which exists only where it was downloaded), and resolve
    it in their own node's HF cache: here a cache laid out as the hub's, offline, as a node that fetched it has."""
    import shutil

    snapshot = tmp_path / "hub" / "models--mapoco-test--tiny" / "snapshots" / "0123abc"
    shutil.copytree(tiny_dirs["tiny-qwen"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert registry.resolve_model("mapoco-test/tiny", download=False) == snapshot
    assert registry.node_source("mapoco-test/tiny", snapshot) == "mapoco-test/tiny"  # what the actors get
    assert registry.node_source("tiny-qwen", tiny_dirs["tiny-qwen"]) == str(tiny_dirs["tiny-qwen"])
    assert registry.resolve_model("mapoco-other/absent", download=False) is None  # not fetched yet: no download


@pytest.mark.parametrize("name", DISCUSSION)
def test_warm_start_accuracy(tiny_dirs, name):
    record = json.loads((tiny_dirs[name] / build.WARMSTART_FILE).read_text())
    assert record["num_eval"] == 200
    assert 0.2 <= record["turn1_accuracy"] <= 0.8
    # Re-measured, not just read: greedy HF generation on the first 50 of those test problems.
    assert 0.1 <= probes.evaluate_turn1(tiny_dirs[name], num=50) <= 0.9


def _conductor_examples(num: int) -> list[tuple[str, int, str]]:
    """(operator, pool size, plan text) of the conductor's warm-start chats."""
    spec = specs.TINY_MODELS["tiny-conductor"]
    problems = arithmetic_problems(spec.task, "train", 500)
    rng = random.Random(0)
    examples = []
    for _ in range(num):
        user, assistant = chat_data.example_chat(rng.choice(problems), spec, rng, problems)
        pool = len(re.findall(r"Model \d", user["content"]))
        operator = re.search(r"\d ([+*]) \d", user["content"]).group(1)
        examples.append((operator, pool, assistant["content"]))
    return examples


def test_conductor_warm_start_plans_are_well_formed_and_route_at_random():
    examples = _conductor_examples(4000)
    sizes, steps, ids = Counter(), Counter(), Counter()
    for operator, pool, text in examples:
        plan = parse_workflow(text, pool).plan
        assert plan is not None and 1 <= len(plan.steps) <= 2, text
        assert [s.sees_all for s in plan.steps] == [False, True][: len(plan.steps)]
        assert [s.subtask for s in plan.steps] == list(chat_data.CONDUCTOR_SUBTASKS[: len(plan.steps)])
        verb = {"+": "adds", "*": "multiplies"}[operator]  # it reads the question first, never naming a worker
        assert text.startswith(f"The question {verb}.\nmodel_id = ["), text
        sizes[pool] += 1
        steps[len(plan.steps)] += 1
        ids.update((operator, pool, s.worker) for s in plan.steps)
    assert set(sizes) == {1, 2, 3} and sizes.most_common(1)[0][0] == 2
    assert 0.15 <= steps[2] / len(examples) <= 0.35  # mostly one step
    for operator in "+*":  # the worker id does not depend on the question
        for pool in (2, 3):
            counts = [ids[operator, pool, worker] for worker in range(pool)]
            assert max(counts) / min(counts) < 1.25, (operator, pool, counts)


def test_carded_warm_start_plans_ask_a_worker_holding_the_card_they_name_whatever_the_question():
    spec = specs.TINY_MODELS["card-conductor"]
    problems = arithmetic_problems(spec.task, "train", 500)
    rng = random.Random(0)
    named, asked = Counter(), Counter()
    for _ in range(2000):
        problem = rng.choice(problems)
        user, assistant = chat_data.example_chat(problem, spec, rng, problems)
        listed = re.search(r"\nCards: (.*)\n", user["content"]).group(1)
        holders: dict[str, list[int]] = {}
        for entry in listed.split("; "):
            card, worker = re.fullmatch(r"(\w+)=Model (\d)", entry).groups()
            holders.setdefault(card, []).append(int(worker))
        size = len(re.findall(r"Model \d", user["content"].split("\n")[1]))
        assert 2 <= size <= 4 and set(holders) <= set(spec.cards)
        assert sorted(i for ids in holders.values() for i in ids) == list(range(size))
        restated, line, lists = assistant["content"].split("\n", 2)
        assert restated == "Listed: " + ", ".join(sorted(listed.split("; "))) + "."
        note = chat_data.operation_note(problem.question).removesuffix(".")
        card = re.fullmatch(rf"{note} (\w+)=Model (\d+)\.", line)  # the pick right after the operation
        plan = parse_workflow(lists, size).plan
        assert card and plan and [s.worker for s in plan.steps] == [int(card.group(2))]
        held = holders[card.group(1)]
        assert int(card.group(2)) in held
        named[note, card.group(1)] += 1
        if len(held) == 2:
            asked[held.index(int(card.group(2)))] += 1  # which of two holders, in listing order
    for note in ("The question adds", "The question multiplies"):  # which card a question needs is RL's to learn
        assert 0.8 < named[note, "adds"] / named[note, "multiplies"] < 1.25, named
    assert 0.8 < asked[0] / asked[1] < 1.25, asked  # any holder, not the first listed


def test_card_conductor_asks_a_worker_holding_the_card_it_names(tiny_dirs):
    """Re-measured at temperature 1 on other questions and pools than its gate's; every pool position gets asked."""
    spec = specs.TINY_MODELS["card-conductor"]
    record = json.loads((tiny_dirs["card-conductor"] / build.WARMSTART_FILE).read_text())
    assert record["validation_accuracy"] >= spec.gate
    stats = probes.evaluate_plans(tiny_dirs["card-conductor"], spec, num=100, seed=1)
    assert stats["parse_rate"] >= 0.9 and stats["card_named_rate"] >= 0.9 and stats["card_held_rate"] >= 0.85, stats
    assert all(min(counts) > 0 for counts in stats["answering_worker"].values()), stats


@pytest.mark.parametrize("question, note", [
    ("Calculate 4 * 1.", "The question multiplies."),
    ("Calculate 3 * 4 + 5.", "The question multiplies, then adds."),  # the shared 4 is both operands
    ("Calculate 2 - -3.", "The question subtracts."),  # a negative operand is not an operation
    ("What is the capital of France?", "The question asks."),
])
def test_the_conductor_reads_the_operations_of_a_question(question, note):
    assert chat_data.operation_note(question) == note


@pytest.mark.parametrize("name", ["tiny-add", "tiny-mul"])
def test_specialist_warm_start_mixes_workflow_steps(name):
    spec = specs.TINY_MODELS[name]
    problems = arithmetic_problems(spec.task, "train", 500)
    rng = random.Random(0)
    chats = [chat_data.example_chat(rng.choice(problems), spec, rng, problems) for _ in range(1000)]
    operator = dict(spec.task_params)["operators"][0]
    assert all(f" {operator} " in chat[0]["content"] and chat[-1]["content"].startswith("\\boxed{") for chat in chats)
    steps = sum(chat[0]["content"].endswith(SUBTASKS) for chat in chats)
    assert 0.4 <= steps / len(chats) <= 0.6


def test_specialists_are_right_on_their_own_operator(tiny_dirs):
    """Greedy accuracy of each specialist on 50 "+" and 50 "*" test questions: each beats the other at its own."""
    acc = {(name, op): probes.evaluate_turn1(tiny_dirs[name], num=50, task=specs.TINY_MODELS[f"tiny-{op}"].task)
           for name in ("tiny-add", "tiny-mul") for op in ("add", "mul")}
    assert acc["tiny-add", "add"] >= 0.7 and acc["tiny-mul", "mul"] >= 0.6, acc
    assert acc["tiny-add", "add"] >= acc["tiny-mul", "add"] + 0.3, acc
    assert acc["tiny-mul", "mul"] >= acc["tiny-add", "mul"] + 0.3, acc


def test_composition_steps_teach_each_specialist_its_part():
    problem = Problem(id="c", question="Calculate 6 * 9 + 6.", gold="60")
    thread, answer = chat_data.composition_step(problem, "*", random.Random(0))
    assert answer == 54 and len(thread) == 1 and thread[0]["content"].startswith(first_turn_message(problem))
    thread, answer = chat_data.composition_step(problem, "+", random.Random(0), earlier=13)  # adds to what it was shown
    assert answer == 19 and [m["role"] for m in thread] == ["user", "assistant", "user"]
    assert thread[1]["content"] == "\\boxed{13}"


def test_part_specialists_do_their_part_and_neither_answers_alone(tiny_dirs):
    """Greedy, on 50 held-out composition questions: part-mul's first step gives the product, part-add's second step
    adds c to a right product, and neither answers the question when asked alone."""
    test = composition_problems("test")[:50]
    for name, operator in (("part-mul", "*"), ("part-add", "+")):
        model, tokenizer = probes.load_model(tiny_dirs[name])
        assert probes.composition_accuracy(model, tokenizer, operator, test) >= 0.8, name
        assert probes.turn1_accuracy(model, tokenizer, test) <= 0.1, name


def test_conductor_writes_parsable_plans(tiny_dirs):
    spec = specs.TINY_MODELS["tiny-conductor"]
    record = json.loads((tiny_dirs["tiny-conductor"] / build.WARMSTART_FILE).read_text())
    assert record["parse_rate"] >= 0.95
    # Re-measured at temperature 1 on 100 test questions; each worker of a pool still gets asked.
    stats = probes.evaluate_plans(tiny_dirs["tiny-conductor"], spec, num=100, seed=1)
    assert stats["parse_rate"] >= 0.9, stats
    assert all(min(counts) > 0 for size, counts in stats["answering_worker"].items() if size != "1"), stats


def test_stable_id_warm_start_names_a_listed_worker_at_random_after_the_operation_and_asks_it():
    spec = specs.TINY_MODELS["pool-conductor"]
    problems = arithmetic_problems(spec.task, "train", 500)
    rng = random.Random(0)
    asked = Counter()
    for _ in range(3000):
        problem = rng.choice(problems)
        user, assistant = chat_data.example_chat(problem, spec, rng, problems)
        ids = [int(i) for i in re.findall(r"Model (\d)", user["content"].split("\nWorkers: ")[1].split("\n")[0])]
        assert 2 <= len(ids) <= 4 and len(set(ids)) == len(ids) and set(ids) <= set(range(spec.stable_ids_of))
        listed, note, lists = assistant["content"].split("\n", 2)
        assert listed == "Listed: " + ", ".join(f"Model {i}" for i in sorted(ids)) + "."
        plan = parse_workflow(lists, ids).plan
        assert plan and len(plan.steps) == 1
        operation = chat_data.operation_note(problem.question).removesuffix(".")
        assert note == f"{operation} Model {plan.steps[0].worker}."  # the plan asks the worker its reasoning named
        asked[operation, len(ids), ids.index(plan.steps[0].worker)] += 1
    for operation in ("The question adds", "The question multiplies"):  # the position named ignores the question
        for size in (2, 3, 4):
            counts = [asked[operation, size, at] for at in range(size)]
            assert max(counts) / min(counts) < 1.5, (operation, size, counts)


def test_pool_conductor_asks_only_listed_workers_and_each_of_them(tiny_dirs):
    """Its tokenizer holds each worker's name as one token; at temperature 1 its plans ask a worker the prompt
    lists (a plan asking another does not parse), every listed position gets asked."""
    path, spec = tiny_dirs["pool-conductor"], specs.TINY_MODELS["pool-conductor"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert all(len(tokenizer.encode(name)) == 1 for name in chat_data.whole_tokens(spec))
    assert json.loads((path / build.WARMSTART_FILE).read_text())["validation_accuracy"] >= spec.gate
    stats = probes.evaluate_plans(path, spec, num=100, seed=1)
    assert stats["parse_rate"] >= 0.9 and stats["pick_copied_rate"] >= 0.9, stats
    assert all(min(counts) > 0 for counts in stats["answering_worker"].values()), stats


def test_a_warm_start_below_its_gate_fails_the_build_and_leaves_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPOCO_CACHE", str(tmp_path))
    spec = replace(specs.TINY_MODELS["pool-conductor"], name="gated", max_steps=2, eval_every=2, gate=0.99)
    monkeypatch.setitem(specs.TINY_MODELS, "gated", spec)
    monkeypatch.setitem(specs.MODEL_DIRS, "gated", "gated")
    with pytest.raises(RuntimeError, match=r"'gated'.* below the spec's gate of 0.99"):
        build.build_tiny_model("gated")
    assert not (registry.model_dir("gated") / registry.MARKER).exists()


def test_smollm2_checkpoint():
    path = registry.model_dir(specs.SMOLLM2)
    if not (path / registry.MARKER).is_file():
        pytest.skip("SmolLM2 is not converted; run `make models`")
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and config.eos_token_id == tok.eos_token_id
    assert getattr(config, "quantization_config", None) is None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert list(path.glob("*.safetensors"))


@pytest.mark.parametrize("domain", ["arithmetic", "numbers"])
def test_specialist_threads_teach_the_format_not_when_to_defer(domain):
    """A specialist's later answer keeps its own or adopts the peer's at random, in its specialty and outside it
    alike: the warm-start leaves *when* to defer to co-training. Its earlier wrong answers are never labels. The
    same in the unseen domain's second specialty (duo-add: a number's first digit; its peer: the last)."""
    spec = specs.TINY_MODELS["duo-add"]
    rng = random.Random(0)
    if domain == "arithmetic":
        own, thread, mark = arithmetic_problems(spec.task, "train", 100), chat_data.arithmetic_thread, " + "
    else:
        own, thread, mark = number_problems("train", ["first_digit"])[:100], chat_data.number_thread, " first "
    kept = {True: [], False: []}
    for _ in range(600):
        chat = thread(rng.choice(own), spec, rng)
        question, first, final = chat[0]["content"], chat[1], chat[-1]["content"]
        in_specialty = mark in question
        peer = re.findall(r"\\boxed\{-?\d+\}", chat[-2]["content"])[0]
        assert final in (chat[-3]["content"], peer)  # the own latest answer or the peer's, nothing else
        kept[in_specialty].append(final == chat[-3]["content"])
        assert first["train"] == in_specialty  # right at turn 1 exactly in its specialty: only then a label
    rates = {side: sum(kept[side]) / len(kept[side]) for side in (True, False)}
    # kept means the final answer equals its own latest (after an adoption both may agree: 0.63 expected either way)
    assert abs(rates[True] - rates[False]) < 0.12 and all(0.5 < rate < 0.76 for rate in rates.values()), rates


def test_a_tiny_build_is_bitwise_reproducible(tmp_path):
    """Same spec and seed: the same tokenizer and the same weights, bit for bit (seeded data, a fixed thread count)."""
    from safetensors.torch import load_file

    spec = replace(specs.TINY_MODELS["talk-add"], name="repro", max_steps=30, eval_every=30, easy_steps=10)
    records = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        records.append(build._build_tiny(spec, tmp_path / name))
    first, second = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("first", "second"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "first" / "tokenizer.json").read_text() == (tmp_path / "second" / "tokenizer.json").read_text()
    assert records[0]["final_loss"] == records[1]["final_loss"]
    assert records[0]["turn1_accuracy"] == records[1]["turn1_accuracy"]
