"""The warm-start's chat data: first-turn answers and discussion threads in the exact message format of
``mapoco.rollout.prompts``, workflow steps in ``mapoco.conductor.workflow``'s, and the conductor's plans."""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from typing import Any

from mapoco.conductor.workers import FAILED
from mapoco.conductor.workflow import (
    SUBTASKS,
    Plan,
    Step,
    card_entry,
    conductor_message,
    replan_message,
    worker_name,
    worker_thread,
)
from mapoco.models.specs import (
    TinyModelSpec,
)
from mapoco.rollout.prompts import PeerAnswer, first_turn_message, later_turn_message
from mapoco.tasks import Problem, TaskConfig, arithmetic_problems, composition_problems, number_problems

TRAIN_POOL = 20_000  # train-split problems the warm-start draws from
CONDUCTOR_SUBTASKS = ("Solve the problem.", "Check the work so far and give the final answer.")  # step 1, step 2


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


@functools.cache
def _peer_problems(spec: TinyModelSpec) -> list[Problem]:
    """Train questions in the peer's specialty (``peer_operators``), for a specialist's discussion threads."""
    task = TaskConfig(params={**spec.task.params, "operators": list(spec.peer_operators)})
    return arithmetic_problems(task, "train", TRAIN_POOL // 4)


def _specialist_thread(problem: Problem, peer_problems: list[Problem], wrong: Callable[[Problem, random.Random], int],
                       rng: random.Random) -> list[dict[str, str]]:
    """A pair discussion as a specialist lives it, on ``problem`` of its specialty or one of its peer's (half each).
    At turn 1 it is right in its specialty and wrong elsewhere (``wrong``), the peer the opposite. At every later turn
    each side keeps its answer or adopts the other's at random, whoever is right, and the target is the specialist's
    next answer drawn the same way, right or wrong: the format is learnt, not when to defer (co-training has to learn
    that). Earlier wrong answers are context, never labels (``"train": False``): no wrong answer is taught."""
    right = True
    if rng.random() < 0.5:
        problem, right = rng.choice(peer_problems), False
    gold = int(problem.gold)
    mine = gold if right else wrong(problem, rng)
    peer = wrong(problem, rng) if right else gold
    peer_index = rng.randrange(2)
    messages = [{"role": "user", "content": first_turn_message(problem)}]
    for _ in range(rng.randint(1, 2)):
        messages.append({"role": "assistant", "content": _boxed(mine), "train": mine == gold})
        later = later_turn_message(problem, [PeerAnswer(peer_index, _boxed(peer))])
        messages.append({"role": "user", "content": later})
        mine, peer = rng.choice((mine, peer)), rng.choice((peer, mine))
    return [*messages, {"role": "assistant", "content": _boxed(mine)}]


def arithmetic_thread(problem: Problem, spec: TinyModelSpec, rng: random.Random) -> list[dict[str, str]]:
    """A specialist's pair discussion on ``problem`` (of its operator) or on one of its peer's operators."""
    peers = _peer_problems(spec)
    return _specialist_thread(problem, peers, lambda p, r: _wrong_answer(int(p.gold), r, peers), rng)


def number_thread(problem: Problem, spec: TinyModelSpec, rng: random.Random) -> list[dict[str, str]]:
    """The same on the second domain: ``problem`` of its own kind, or one of its peer's kind."""
    return _specialist_thread(problem, _number_train(spec.second_domain[1]), number_mistake, rng)


def number_mistake(problem: Problem, rng: random.Random) -> int:
    """The wrong answer to a ``numbers`` question: the digit at the number's other end (the other kind's answer), or
    a neighbouring digit where both ends agree."""
    digits = re.search(r"\d{4}", problem.question).group()
    other = int(digits[-1] if " first " in problem.question else digits[0])
    return other if str(other) != problem.gold else (other + rng.choice((1, 9))) % 10


@functools.cache
def _number_train(kind: str) -> list[Problem]:
    return number_problems("train", [kind])


def _second_domain_chat(spec: TinyModelSpec, rng: random.Random) -> list[dict[str, str]]:
    """An example of the second domain: a first-turn answer of its own kind, or (``discussion_fraction``) a pair
    discussion with a peer who knows the other kind, in ``_specialist_thread``'s keep-or-adopt-at-random format."""
    problem = rng.choice(_number_train(spec.second_domain[0]))
    if rng.random() < spec.discussion_fraction:
        return number_thread(problem, spec, rng)
    return [{"role": "user", "content": first_turn_message(problem)},
            {"role": "assistant", "content": _boxed(problem.gold)}]


def _workflow_step(problem: Problem, spec: TinyModelSpec, rng: random.Random, others: list[Problem]) -> list[dict]:
    """What a workflow step's worker sees (``worker_thread``): a first step, or a second step that sees a first
    step's answer, right or wrong."""
    first = Step(0, rng.choice(SUBTASKS), False)
    if rng.random() >= spec.two_step_fraction:
        return worker_thread(problem, Plan((first,)), 0, [])
    earlier = int(problem.gold) if rng.random() < 0.5 else _wrong_answer(int(problem.gold), rng, others)
    return worker_thread(problem, Plan((first, Step(0, rng.choice(SUBTASKS), True))), 1, [_boxed(earlier)])


_COMPOSITION = re.compile(r"(\d+) \* (\d+) \+ (\d+)")


def operands(problem: Problem) -> tuple[int, int, int]:
    a, b, c = (int(x) for x in _COMPOSITION.search(problem.question).groups())
    return a, b, c


def composition_step(problem: Problem, operator: str, rng: random.Random, earlier: int | None = None
                     ) -> tuple[list[dict[str, str]], int]:
    """A composition specialist's step of ``a * b + c`` and its right answer: the ``*`` specialist's first step
    (the product), or the ``+`` specialist's second step, which sees a first step's answer (``earlier``; by
    default the product three times in four, another number otherwise) and adds c to it, whatever it is."""
    a, b, c = operands(problem)
    first = Step(0, rng.choice(SUBTASKS), False)
    if operator == "*":
        return worker_thread(problem, Plan((first,)), 0, []), a * b
    if earlier is None:
        earlier = a * b if rng.random() < 0.75 else rng.randint(4, 81)
    plan = Plan((first, Step(1, rng.choice(SUBTASKS), True)))
    return worker_thread(problem, plan, 1, [_boxed(earlier)]), earlier + c


_OPERATIONS = {"+": "adds", "-": "subtracts", "*": "multiplies"}


def operation_note(question: str) -> str:
    """A conductor's reasoning line: the operations the question asks for, in order ("The question multiplies,
    then adds."). It reads the question and names no worker: whom to ask stays RL's to learn."""
    verbs = [_OPERATIONS[op] for op in re.findall(r"\d\s*([-+*])(?=\s*\(?-?\d)", question)]
    return f"The question {', then '.join(verbs) or 'asks'}."


def whole_tokens(spec: TinyModelSpec) -> list[str]:
    """Words a conductor's tokenizer keeps whole: each worker's name ("Model 3") and each card entry of its listing
    ("adds=Model 0"). Which workers a prompt lists, or which hold a card, is then which tokens it holds: a look-up
    tiny models learn (a stable-id pool's listed ids: sampled parse rate 0.855 after 4,000 steps with name tokens,
    0.74-0.78 without). Finding the worker after a card across several tokens ("adds", "=", "Model 0") is an
    induction the tiny models here did not learn (the worker asked held the card named 0.41-0.70 of the time in
    seven formats and sizes, up to 4,000 steps; 0.65 by chance)."""
    if not spec.stable_ids_of and not spec.cards:
        return []  # the first conductors' tokenizers, as they were built
    workers = range(spec.stable_ids_of or max(spec.pool_sizes))
    names = [worker_name(i) for i in workers] + [card_entry(card, i) for card in spec.cards for i in workers]
    # Each with the space before it (every one follows a space: ": Model 1", ", Model 1", "multiplies Model 1"), so
    # the token that predicts a pick (``pick_line``) is the operation's own word.
    return [" " + name for name in names]


def pool_line(ids: list[int], cards: list[str] = ()) -> str:
    """A pool conductor's first reasoning line: what its prompt lists, sorted: the ids ("Listed: Model 1, Model 3.")
    or the card entries ("Listed: adds=Model 2, multiplies=Model 0."). Each entry in it is a look-up in the prompt,
    and the plan's pick then reads off it: with it a stable-id conductor asked only listed workers 0.995 of the
    time after 3,000 steps, 0.855 without it after 4,000."""
    entries = [card_entry(card, i) for i, card in zip(ids, cards)] if cards else [worker_name(i) for i in ids]
    return "Listed: " + ", ".join(sorted(entries)) + "."


# A pool conductor's pick (``pick_line``): the card named (None without cards) and the worker
PICK_LINE = re.compile(r"^The question [a-z, ]+? (?:([a-z]+)=)?Model (\d+)\.$", re.M)


def pick_line(question: str, worker: int, card: str = "") -> str:
    """A pool conductor's second reasoning line: the operation, and right after its word the pick ("The question
    multiplies Model 3.", with cards "The question adds adds=Model 1."). The token that predicts the pick is that
    word, so what RL learns there depends on the question from its first step. With the pick a few tokens further
    (in the plan, or on a line of its own), a tiny conductor trained to read the pick off the listing barely looked
    at the question from there (attention 0.024), and RL pushed every question to the slightly better worker."""
    return f"{operation_note(question).removesuffix('.')} {card_entry(card, worker) if card else worker_name(worker)}."


def _conductor_chat(problem: Problem, spec: TinyModelSpec, rng: random.Random) -> list[dict]:
    """A conductor prompt and a well-formed plan: a line that reads the question, then one step, sometimes a second
    that sees the first. Worker ids are uniform and independent of the question, so the plan's form is learnt but
    not whom to ask; each step position has one subtask, so whom to ask and how many steps are the only choices.
    With ``spec.stable_ids_of`` or ``spec.cards`` the reasoning first restates the pool (``pool_line``), then names
    the pick right after the operation (``pick_line``): a listed worker, or with cards a card of the pool's drawn
    uniformly and one of its holders at random (the prompt's "adds=Model 0"), which the plan asks. Reading the pool
    is learnt, which worker or card a question needs is not.

    Why so focused: with subtasks worded at random (2.4 of a plan's 4 nats of entropy, against 0.7 for the worker
    id) and no line that reads the question, GRPO's signal drowned in the noise of the other tokens: 150 steps
    learnt routing in one build and seed (0.89) and collapsed onto one worker in others (0.48)."""
    size = rng.choice(spec.pool_sizes)
    count = 1 + (rng.random() < spec.two_step_fraction)
    cards = [rng.choice(spec.cards) for _ in range(size)] if spec.cards else []
    ids = rng.sample(range(spec.stable_ids_of), size) if spec.stable_ids_of else list(range(size))
    # A pool's restated listing comes first; the choice RL shapes (the card, or the worker) then follows the
    # operation's word on the next line.
    if cards:
        card = rng.choice(sorted(set(cards)))
        workers = [rng.choice([i for i, held in zip(ids, cards) if held == card])] * count  # a holder at random
    else:
        card, workers = "", [ids[rng.randrange(size)] for _ in range(count)]
    reasons = ([pool_line(ids, cards), pick_line(problem.question, workers[-1], card)] if spec.stable_ids_of or cards
               else [operation_note(problem.question)])
    plan = Plan(tuple(Step(worker, CONDUCTOR_SUBTASKS[i], i > 0) for i, worker in enumerate(workers)))
    chat = [{"role": "user", "content": conductor_message(problem.question, ids, cards=cards)},
            {"role": "assistant", "content": "\n".join([*reasons, plan.lists()])}]
    if spec.replan_fraction and rng.random() < spec.replan_fraction:
        chat += _replan_turn(problem, spec, rng, ids)
    return chat


def _replan_turn(problem: Problem, spec: TinyModelSpec, rng: random.Random, ids: list[int]) -> list[dict]:
    """The re-plan round: the workflow's answer (a boxed number or a worker's error reply, at random), then, whatever
    it was, accepting it (three empty lists) or a new plan drawn as a first one is: half and half. The form is
    learnt; when to re-plan is RL's."""
    shown = (f"[worker error: {FAILED}]" if rng.random() < 0.5 else
             f"The answer is {_boxed(rng.randrange(100))}.")
    if rng.random() < 0.5:
        reply = Plan(()).lists()
    else:
        count = 1 + (rng.random() < spec.two_step_fraction)
        workers = [ids[rng.randrange(len(ids))] for _ in range(count)]
        plan = Plan(tuple(Step(worker, CONDUCTOR_SUBTASKS[i], i > 0) for i, worker in enumerate(workers)))
        reply = "\n".join([operation_note(problem.question), plan.lists()])
    return [{"role": "user", "content": replan_message(shown)}, {"role": "assistant", "content": reply}]


def example_chat(problem: Problem, spec: TinyModelSpec, rng: random.Random, others: list[Problem]) -> list[dict]:
    """A solver's first-turn chat, discussion thread or workflow step, ending with the correct boxed answer as the
    assistant target; a conductor's prompt and plan."""
    if spec.role == "conductor":
        return _conductor_chat(problem, spec, rng)
    if spec.second_domain and rng.random() < spec.second_domain_fraction:
        return _second_domain_chat(spec, rng)
    draw = rng.random()
    if draw >= 1 - spec.composition_fraction:
        thread, answer = composition_step(rng.choice(_composition_train()), spec.task.params["operators"][0], rng)
        return [*thread, {"role": "assistant", "content": _boxed(answer)}]
    if draw < spec.discussion_fraction and spec.peer_operators:
        return arithmetic_thread(problem, spec, rng)
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


def one_digit_operands(problem: Problem) -> bool:
    return all(len(number) == 1 for number in re.findall(r"\d+", problem.question))


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
