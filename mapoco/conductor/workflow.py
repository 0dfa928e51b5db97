"""The Conductor's workflows: the prompt that asks for one, the parser that reads it, and what a step sees.

A workflow is three equal-length Python lists in the conductor's reply, after free reasoning::

    model_id = [1, 0]
    subtasks = ["Solve the problem.", "Check the answer and give the final one."]
    access_list = [[], ["all"]]

Parsing is lenient about layout (code fences, quotes, ``:`` for ``=``, a missing closing bracket) and strictly
literal: the extracted lists go through ``ast.literal_eval``, never ``eval``, so a reply cannot run code. Anything
else wrong (unequal lengths, unknown worker ids, more steps than allowed) makes the plan malformed.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mapoco.config import WorkflowConfig
from mapoco.rollout.prompts import first_turn_message
from mapoco.tasks import Problem

LIST_NAMES = ("model_id", "subtasks", "access_list")
_NEXT_FIELD = re.compile(rf"\n\s*(?:(?:{'|'.join(LIST_NAMES)})\b\s*[=:]|```)")
SUBTASKS = ("Solve the problem.", "Answer the question.", "Check the work so far and give the final answer.")
# Smart quotes and the like, as chat models write them, mapped to what literal_eval reads.
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u00ab": '"', "\u00bb": '"'})


@dataclass(frozen=True)
class Step:
    worker: int  # the id the conductor asked: a position in the question's pool, or a stable worker id
    subtask: str
    sees_all: bool  # access ["all"]: sees every earlier step
    sees: tuple[int, ...] = ()  # else the earlier steps it sees, by index (access [0, 2]); () with access []

    def access(self) -> list:
        return ["all"] if self.sees_all else list(self.sees)

    def seen(self, index: int) -> list[int]:
        """The earlier steps step ``index`` sees."""
        return list(range(index)) if self.sees_all else list(self.sees)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    def lists(self) -> str:
        """The plan written back in the conductor's format (warm-start targets, transcripts)."""
        return (f"model_id = {[s.worker for s in self.steps]}\n"
                f"subtasks = {[s.subtask for s in self.steps]!r}\n"
                f"access_list = {[s.access() for s in self.steps]}")


@dataclass(frozen=True)
class Parsed:
    plan: Plan | None  # None: malformed, or (``accepts``) three empty lists
    error: str | None = None
    accepts: bool = False  # three empty lists: a re-plan round keeps the answer it was shown

    @property
    def malformed(self) -> bool:
        return self.error is not None


def pool_ids(workers: int | Sequence[int]) -> list[int]:
    """The ids a conductor may ask: ``0 .. n-1`` for a pool of ``n`` (renumbered), or the pool's own ids in the order
    it lists them (stable: a worker keeps its number in every pool)."""
    return list(range(workers)) if isinstance(workers, int) else list(workers)


def worker_name(worker: int) -> str:
    """What the conductor's prompt calls a worker ("Model 3")."""
    return f"Model {worker}"


def card_entry(card: str, worker: int) -> str:
    """A worker's card as the prompt's "Cards:" line lists it ("adds=Model 3")."""
    return f"{card}={worker_name(worker)}"


def conductor_message(question: str, workers: int | Sequence[int], examples: Sequence[str] = (),
                      cards: Sequence[str] = ()) -> str:
    """The conductor's user message: the question and the pool as "Model 0 … Model k-1" (or the pool's stable ids,
    "Model 3, Model 1"; names hidden), then, where workers have cards (one per listed id), each carded worker's card
    ("Cards: multiplies=Model 1; adds=Model 0; adds=Model 2"), in an order shuffled per question."""
    ids = pool_ids(workers)
    pool = ", ".join(worker_name(i) for i in ids)
    entries = [card_entry(card, i) for i, card in zip(ids, cards) if card]
    random.Random(question).shuffle(entries)  # no card or worker always first; one listing per question's samples
    listed = "; ".join(entries)
    shots = "".join(f"Example:\n{example}\n\n" for example in examples)
    return (f"{shots}Question: {question}\nWorkers: {pool}\n" + (f"Cards: {listed}\n" if listed else "") +
            "Reason, then write the workflow as three Python lists of equal length, at most 5 steps: model_id "
            "(the worker of each step), subtasks (what it is asked) and access_list ([\"all\"] to see every "
            "earlier step, [] to see none). The last step gives the answer.")


def replan_message(answer: str) -> str:
    return (f"The workflow answered:\n{answer.strip()}\nReturn three empty lists to accept this answer, or a new "
            "workflow.")


def _list_after(text: str, name: str) -> str | None:
    """The bracketed literal after the last ``name =`` (or ``name:``); closes brackets a reply left open, where
    the next field or a code fence begins."""
    found = None
    for found in re.finditer(rf"\b{name}\b\s*[=:]\s*\[", text):
        pass
    if found is None:
        return None
    start, depth, quote, escaped = found.end() - 1, 0, None, False
    next_field = _NEXT_FIELD.search(text, found.end())
    stop = next_field.start() if next_field else len(text)
    for i in range(start, stop):
        char = text[i]
        if quote:
            quote = None if char == quote and not escaped else quote
            escaped = char == "\\" and not escaped
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return text[start:stop].rstrip().rstrip(",") + "]" * depth


def _literal(source: str) -> list | None:
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, list) else None


def _flat(value: list) -> list:
    """``[[0, 1]]`` for ``[0, 1]``: one redundant bracket pair is noise, not a different plan."""
    return value[0] if len(value) == 1 and isinstance(value[0], list) else value


def _show(value: object) -> str:
    """``repr`` for an error message; a huge int (``0xfff…``) has no decimal repr past 4300 digits."""
    try:
        return repr(value)[:200]
    except ValueError:
        return f"<{type(value).__name__}>"


def _access(entry: object, index: int) -> tuple[bool, tuple[int, ...]] | None:
    """(sees every earlier step, else which) for ["all"] (or "all"), [] (or "none") and a list of earlier step
    indices ([0, 2], the paper's access lists); None for anything else, a later or its own step included."""
    if entry in (["all"], "all", ("all",)):
        return True, ()
    if entry in ([], "none", ()):
        return False, ()
    if isinstance(entry, list) and all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < index
                                       for j in entry):
        return False, tuple(sorted(set(entry)))
    return None


def parse_workflow(text: str, workers: int | Sequence[int], max_steps: int = 5) -> Parsed:
    """``workers``: the pool's size (ids 0..n-1) or its ids; a plan that asks any other id is malformed."""
    allowed = pool_ids(workers)
    lists = {}
    for name in LIST_NAMES:
        source = _list_after(text.translate(_QUOTES), name)
        value = None if source is None else _literal(source)
        if value is None:
            return Parsed(None, f"no parsable {name} list")
        lists[name] = value
    ids, subtasks, access = _flat(lists["model_id"]), _flat(lists["subtasks"]), lists["access_list"]
    if not ids and not subtasks and not access:
        return Parsed(None, accepts=True)
    if not len(ids) == len(subtasks) == len(access):
        return Parsed(None, f"lists of unequal length ({len(ids)}, {len(subtasks)}, {len(access)})")
    if len(ids) > max_steps:
        return Parsed(None, f"{len(ids)} steps, more than {max_steps}")
    steps = []
    for index, (worker, subtask, entry) in enumerate(zip(ids, subtasks, access)):
        if isinstance(worker, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", worker):  # not "²", not 5000 digits
            worker = int(worker)
        if not isinstance(worker, int) or isinstance(worker, bool) or worker not in allowed:
            return Parsed(None, f"unknown worker {_show(worker)} (the pool has {', '.join(map(str, allowed))})")
        seen = _access(entry, index)
        if not isinstance(subtask, str) or seen is None:
            return Parsed(None, f"bad step ({_show(subtask)}, {_show(entry)})")
        steps.append(Step(worker, subtask.strip(), *seen))
    return Parsed(Plan(tuple(steps)))


def flow_lists(flow: WorkflowConfig) -> str:
    """A hand-written workflow (``conductor.fixed_workflows``) in the conductor's format, for the same parser."""
    return f"model_id = {flow.model_id!r}\nsubtasks = {flow.subtasks!r}\naccess_list = {flow.access_list!r}"


def waves(plan: Plan) -> list[int]:
    """The round in which each step can run: a step waits for the steps it sees; one that sees none can start at
    once. Steps of one round run concurrently."""
    rounds: list[int] = []
    for i, step in enumerate(plan.steps):
        rounds.append(max((rounds[j] + 1 for j in step.seen(i)), default=0))
    return rounds


def worker_message(problem: Problem, subtask: str) -> str:
    """A step's first user message: the question (with its answer format), then the step's subtask."""
    return f"{first_turn_message(problem)}\n{subtask}" if subtask else first_turn_message(problem)


def worker_thread(problem: Problem, plan: Plan, index: int, responses: Sequence[str | None]) -> list[dict[str, str]]:
    """What step ``index``'s worker sees: the question, the (subtask, response) pairs its access grants as
    earlier chat turns, then its own subtask."""
    step = plan.steps[index]
    granted = [(plan.steps[j].subtask, responses[j]) for j in step.seen(index)]
    messages: list[dict[str, str]] = []
    for subtask, response in granted:
        content = worker_message(problem, subtask) if not messages else subtask
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": response or ""}]
    content = worker_message(problem, step.subtask) if not messages else step.subtask
    return [*messages, {"role": "user", "content": content}]


def conductor_reward(parsed: Parsed, correct: bool, cost_penalty: float = 0.0) -> float:
    """0 for a malformed plan; a parsed plan earns 1 for a right answer, 0.5 for a wrong one, less what its
    calls cost (``cost_penalty``, already weighted and scaled)."""
    if parsed.malformed:
        return 0.0
    return (1.0 if correct else 0.5) - cost_penalty


def turn_rewards(standing: Sequence[float], turns: int, kind: str = "change") -> list[float]:
    """What each of a question's ``turns`` conductor turns earns, from ``standing``: the reward of the answer that
    stood after each round, the final one last. ``change``: the first plan its own outcome, a re-plan the final
    outcome minus what accepting would have earned (the answer before it); accepting earns 0, a re-plan that fixes a
    wrong answer +0.5 and one that breaks a right one -0.5, whatever the first plan did. ``discounted`` (the paper's,
    for one group over every round, as its code weighs them): a turn before the last 0.75 of its round's outcome and
    0.25 of the final one."""
    final = standing[-1]
    if kind == "discounted":
        return [0.75 * standing[k] + 0.25 * final for k in range(turns - 1)] + [final]
    return [standing[0]] + [final - standing[k - 1] for k in range(1, turns)]


def random_plan(num_workers: int, rng: random.Random, max_steps: int = 5) -> Plan:
    """A random well-formed workflow (the evaluation's baseline)."""
    size = rng.randint(1, max_steps)
    return Plan(tuple(Step(rng.randrange(num_workers), rng.choice(SUBTASKS), i > 0 and rng.random() < 0.5)
                      for i in range(size)))


def single_step(worker: int) -> Plan:
    """One worker alone answers the question (the per-worker baseline)."""
    return Plan((Step(worker, SUBTASKS[0], False),))
