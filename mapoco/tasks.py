"""Task registry: every task turns its source rows into ``Problem``s with an exact gold answer.

Sources are either generated (``arithmetic`` through reasoning-gym) or loaded with ``datasets`` from local files
(json/jsonl/parquet/csv) or the hub. Rows without a usable gold answer are skipped and counted.
"""

from __future__ import annotations

import ast
import functools
import itertools
import json
import operator
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapoco.answers import NLI_LABELS

MATH_INSTRUCTION = "Put the final answer in \\boxed{}."
NLI_INSTRUCTION = "Answer with one word: entailment, neutral or contradiction."


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str
    kind: str = "math"  # "math" | "nli"
    # The question a sample was drawn for (``training.batch.with_samples``): the samples of one question form a group
    # (GRPO's baseline, the Conductor's pool), while each keeps an id (and so request seeds) of its own.
    group: str | None = field(default=None, repr=False)  # not in repr: built models' fingerprints hold reprs

    @property
    def group_id(self) -> str:
        return self.id if self.group is None else self.group


@dataclass(frozen=True)
class TaskConfig:
    name: str = "arithmetic"
    split: str = "test"
    limit: int | None = None
    path: str | None = None  # local file of the evaluation split; None -> hub (or the generator)
    train_path: str | None = None  # local file of the training split (`mapoco train`, `train-verifier`)
    hub: str | None = None
    hub_config: str | None = None
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskData:
    problems: list[Problem]
    skipped: int = 0  # rows without a usable question or gold answer, and malformed lines


class TaskDataError(ValueError):
    """A dataset source that cannot give a single problem; the message names the config key and the file."""


RowParser = Callable[[dict[str, Any], int], Problem | None]
_PARSERS: dict[str, RowParser] = {}
_GENERATORS: dict[str, Callable[[TaskConfig, str], TaskData]] = {}


def register_parser(name: str) -> Callable[[RowParser], RowParser]:
    def wrap(fn: RowParser) -> RowParser:
        _PARSERS[name] = fn
        return fn

    return wrap


def task_names() -> list[str]:
    return sorted({*_PARSERS, *_GENERATORS})


def instruction(kind: str) -> str:
    return NLI_INSTRUCTION if kind == "nli" else MATH_INSTRUCTION


# ---------------------------------------------------------------- generated: arithmetic
ARITHMETIC_DEFAULTS: dict[str, Any] = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+", "-"],
    "allow_parentheses": False,
    "allow_negation": False,
}
_SPLIT_SEED_OFFSET = {"test": 0, "validation": 1, "train": 2}

# The splits each task's source has (the hub's, or the generator's seed streams; anli reads validation as dev), and
# the params it takes: config.validate checks task.split and task.params against them.
TASK_SPLITS = {"arithmetic": ("train", "validation", "test"), "composition": ("train", "validation", "test"),
               "numbers": ("train", "validation", "test"), "gsm8k": ("train", "test"), "tinygsm": ("train",),
               "anli": ("train", "dev", "validation", "test")}
TASK_PARAMS = {"arithmetic": tuple(ARITHMETIC_DEFAULTS), "composition": (), "numbers": ("kinds",), "anli": ("round",),
               "gsm8k": (), "tinygsm": ()}
ARITHMETIC_OPERATORS = ("+", "-", "*", "/")  # reasoning-gym basic_arithmetic's
ANLI_ROUNDS = (1, 2, 3)


def arithmetic_problems(cfg: TaskConfig, split: str, size: int, offset: int = 0) -> list[Problem]:
    """``size`` reasoning-gym problems of ``split``; the seed differs per split so splits are distinct streams."""
    import reasoning_gym

    params = {**ARITHMETIC_DEFAULTS, **cfg.params}
    seed = cfg.seed * 1000 + _SPLIT_SEED_OFFSET.get(split, 3)
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=offset + size, seed=seed, **params)
    return [
        Problem(id=f"arithmetic-{split}-{i}", question=dataset[i]["question"], gold=str(dataset[i]["answer"]))
        for i in range(offset, offset + size)
    ]


def _generate_arithmetic(cfg: TaskConfig, split: str) -> TaskData:
    return TaskData(arithmetic_problems(cfg, split, cfg.limit or 200))


_GENERATORS["arithmetic"] = _generate_arithmetic


# ---------------------------------------------------------------- generated: composition
# Every question ``a * b + c`` (a, b in 2..9, c in 1..9: the product is never the answer), shuffled once and cut
# into disjoint splits: test questions are never trained on.
COMPOSITION_SPLITS = {"test": (0, 200), "validation": (200, 276), "train": (276, 576)}


def composition_problems(split: str) -> list[Problem]:
    """The questions of ``split`` of the composition task, a two-operation question no one-operator specialist
    answers alone: a ``*`` step must feed a ``+`` step."""
    triples = [(a, b, c) for a in range(2, 10) for b in range(2, 10) for c in range(1, 10)]
    random.Random(0).shuffle(triples)
    start, stop = COMPOSITION_SPLITS[split]
    return [Problem(id=f"composition-{split}-{i}", question=f"Calculate {a} * {b} + {c}.", gold=str(a * b + c))
            for i, (a, b, c) in enumerate(triples[start:stop], start=start)]


def _generate_composition(cfg: TaskConfig, split: str) -> TaskData:
    return TaskData(composition_problems(split)[: cfg.limit])


_GENERATORS["composition"] = _generate_composition


# ---------------------------------------------------------------- generated: numbers
# Questions about a number's digits that ask no arithmetic (MAPoRL's unseen domain): the first or the last digit of a
# four-digit number. Every question of a kind, shuffled once and cut into disjoint splits: a test question is never
# a training one.
NUMBER_KINDS = ("first_digit", "last_digit")
NUMBER_SPLITS = {"test": (0, 0.15), "validation": (0.15, 0.2), "train": (0.2, 1.0)}


@functools.cache
def _numbers_split(kind: str, split: str) -> tuple[Problem, ...]:
    which = kind.removesuffix("_digit")
    numbers = list(range(1000, 10000))
    random.Random(NUMBER_KINDS.index(kind)).shuffle(numbers)
    start, stop = (int(share * len(numbers)) for share in NUMBER_SPLITS[split])
    return tuple(Problem(id=f"numbers-{kind}-{split}-{i}", question=f"What is the {which} digit of {n}?",
                         gold=str(n)[0 if which == "first" else -1])
                 for i, n in enumerate(numbers[start:stop], start=start))


def number_problems(split: str, kinds: Iterable[str] = NUMBER_KINDS, limit: int | None = None) -> list[Problem]:
    """The questions of ``split`` of the ``numbers`` task, the kinds taking turns (an evaluation of any size holds
    each kind about equally)."""
    parts = [_numbers_split(kind, split) for kind in kinds]
    mixed = [p for row in itertools.zip_longest(*parts) for p in row if p is not None]
    return mixed[:limit]


def _generate_numbers(cfg: TaskConfig, split: str) -> TaskData:
    return TaskData(number_problems(split, cfg.params.get("kinds", NUMBER_KINDS), cfg.limit))


_GENERATORS["numbers"] = _generate_numbers


# ---------------------------------------------------------------- loaded: gsm8k, tinygsm, anli
HUB_DEFAULTS: dict[str, tuple[str, str | None]] = {
    "gsm8k": ("openai/gsm8k", "main"),
    "tinygsm": ("TinyGSM/TinyGSM", None),
    "anli": ("facebook/anli", None),
}


def _gsm8k_gold(answer: Any) -> str | None:
    if not isinstance(answer, str) or "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


@register_parser("gsm8k")
def _gsm8k_row(row: dict[str, Any], index: int) -> Problem | None:
    gold = _gsm8k_gold(row.get("answer"))
    question = row.get("question")
    if not gold or not isinstance(question, str):
        return None
    return Problem(id=f"gsm8k-{index}", question=question.strip(), gold=gold)


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _arith(node: ast.AST, env: dict[str, float]) -> float:
    """Evaluate a numeric expression over known names; anything else (calls, attributes) raises ValueError."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _arith(node.operand, env)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _arith(node.left, env), _arith(node.right, env)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _BINOPS[type(node.op)](left, right)
    raise ValueError(f"unsupported expression: {ast.dump(node)[:60]}")


def straight_line_program_answer(code: str) -> str | None:
    """TinyGSM gold answers are small straight-line programs; interpret assignments and the return statement
    with a numeric-only evaluator (never ``exec``). Programs outside that subset have no usable gold answer."""
    try:
        tree = ast.parse(code)
        func = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
        env: dict[str, float] = {}
        for stmt in func.body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # docstring
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                env[stmt.targets[0].id] = _arith(stmt.value, env)
            elif isinstance(stmt, ast.Return) and stmt.value is not None:
                value = _arith(stmt.value, env)
                return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
            else:
                return None
    except (SyntaxError, StopIteration, ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    return None


@register_parser("tinygsm")
def _tinygsm_row(row: dict[str, Any], index: int) -> Problem | None:
    question = row.get("question")
    if not isinstance(question, str):
        return None
    gold = _gsm8k_gold(row.get("answer")) or (str(row["answer"]) if "answer" in row and row["answer"] else None)
    if gold is None and isinstance(row.get("code"), str):
        gold = straight_line_program_answer(row["code"])
    return Problem(id=f"tinygsm-{index}", question=question.strip(), gold=gold) if gold else None


@register_parser("anli")
def _anli_row(row: dict[str, Any], index: int) -> Problem | None:
    label = row.get("label")
    premise, hypothesis = row.get("premise"), row.get("hypothesis")
    if isinstance(label, str) and label.lower() in NLI_LABELS:
        gold = label.lower()
    elif isinstance(label, int) and 0 <= label < len(NLI_LABELS):
        gold = NLI_LABELS[label]
    else:
        return None
    if not isinstance(premise, str) or not isinstance(hypothesis, str):
        return None
    question = f"Premise: {premise.strip()}\nHypothesis: {hypothesis.strip()}\nDoes the premise entail the hypothesis?"
    return Problem(id=f"anli-{row.get('uid', index)}", question=question, gold=gold, kind="nli")


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(suffix, "json")


def _read_json_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of a JSON-lines file; a line that is not a JSON object is counted, not fatal (one bad line in a
    100k-row file should not cost the run). ``datasets``' own JSON reader aborts on the first one."""
    rows, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _load_rows(cfg: TaskConfig, split: str) -> tuple[Iterable[dict[str, Any]], int, str]:
    """(rows, malformed rows, a description of the source for error messages)."""
    from datasets import Dataset, load_dataset

    key, local = ("task.train_path", cfg.train_path) if split == "train" else ("task.path", cfg.path)
    if local:
        path = Path(local).expanduser()
        source = f"{key}={local}"
        if not path.is_file():
            raise TaskDataError(f"{source}: no such file")
        if path.stat().st_size == 0:
            raise TaskDataError(f"{source}: the file is empty")
        if path.suffix.lower() == ".jsonl":
            rows, bad = _read_json_lines(path)
            return Dataset.from_list(rows), bad, source
        try:
            return load_dataset(_file_format(path), data_files=str(path), split="train"), 0, source
        except Exception as exc:  # pyarrow/datasets errors say little about which setting to fix
            raise TaskDataError(f"{source}: cannot be read as {_file_format(path)} ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from exc
    hub, hub_config = HUB_DEFAULTS.get(cfg.name, (None, None))
    hub, hub_config = cfg.hub or hub, cfg.hub_config or hub_config
    if cfg.name == "anli":
        split = f"{split if split != 'validation' else 'dev'}_r{cfg.params.get('round', 1)}"
    return load_dataset(hub, hub_config, split=split), 0, f"task.hub={hub} split={split}"


def load_task(cfg: TaskConfig, split: str | None = None) -> TaskData:
    """The problems of ``cfg.name`` for ``split`` (default ``cfg.split``), at most ``cfg.limit`` of them."""
    split = split or cfg.split
    if cfg.name in _GENERATORS:
        return _GENERATORS[cfg.name](cfg, split)
    parser = _PARSERS[cfg.name]
    rows, skipped, source = _load_rows(cfg, split)
    problems = []
    for index, row in enumerate(rows):
        problem = parser(row, index)
        if problem is None:
            skipped += 1
            continue
        problems.append(problem)
        if cfg.limit is not None and len(problems) >= cfg.limit:
            break
    if not problems:
        raise TaskDataError(f"{source}: no usable {cfg.name} problem in it ({skipped} rows skipped: malformed, or "
                            f"missing the fields task={cfg.name} reads)")
    return TaskData(problems, skipped)
