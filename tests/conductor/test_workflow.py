"""The Conductor's workflow format: parsing (lenient layout, strict literals, never executed), rounds, what each
step sees, the conductor's reward and the random / single-step baselines. Pure Python, no engines."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mapoco.conductor.workflow import (
    SUBTASKS,
    Parsed,
    Plan,
    Step,
    conductor_message,
    conductor_reward,
    parse_workflow,
    random_plan,
    single_step,
    turn_rewards,
    waves,
    worker_message,
    worker_thread,
)
from mapoco.rollout.prompts import first_turn_message
from mapoco.tasks import Problem

PROBLEM = Problem(id="p0", question="What is 3 + 4?", gold="7")
TWO_STEPS = Plan((Step(1, "Solve the problem.", False), Step(0, "Check the answer.", True)))


def _reply(model_id: str, subtasks: str, access: str) -> str:
    return f"model_id = {model_id}\nsubtasks = {subtasks}\naccess_list = {access}"


def _plan(text: str, num_workers: int = 3, max_steps: int = 5) -> Plan:
    parsed = parse_workflow(text, num_workers, max_steps)
    assert not parsed.malformed, parsed.error
    assert parsed.plan is not None
    return parsed.plan


def _malformed(text: str, num_workers: int = 3, max_steps: int = 5) -> Parsed:
    parsed = parse_workflow(text, num_workers, max_steps)
    assert parsed.malformed and parsed.plan is None and not parsed.accepts
    return parsed


# --- well-formed replies -------------------------------------------------------------------------------------------

WELL_FORMED = {
    "plain": _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[[], ["all"]]'),
    "reasoning first": "Model 1 looks strongest, so it solves; Model 0 checks (access [] would hide the work).\n"
                       + _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[[], ["all"]]'),
    "code fence": "Plan:\n```python\n"
                  + _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[[], ["all"]]') + "\n```\nDone.",
    "colons": 'model_id: [1, 0]\nsubtasks: ["Solve the problem.", "Check the answer."]\naccess_list: [[], ["all"]]',
    "smart quotes": _reply("[1, 0]", "[\u201cSolve the problem.\u201d, \u2018Check the answer.\u2019]",
                           "[[], [\u201call\u201d]]"),
    "single quotes": _reply("[1, 0]", "['Solve the problem.', 'Check the answer.']", "[[], ['all']]"),
    "no closing bracket": _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[[], ["all"]'),
    "no closing brackets": _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[[], ["all"'),
    "trailing comma, open": _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[[], ["all"],\n'),
    "open mid-reply": _reply("[1, 0", '["Solve the problem.", "Check the answer."', '[[], ["all"]]'),
    "open before a fence": "```\n" + _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[[], ["all"]')
                           + "\n```\nThat is the plan.",
    "redundant brackets": _reply("[[1, 0]]", '[["Solve the problem.", "Check the answer."]]', '[[], ["all"]]'),
    "digit strings": _reply('["1", " 0 "]', '["Solve the problem.", "Check the answer."]', '[[], ["all"]]'),
    "access words": _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '["none", "all"]'),
    "access tuple": _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[(), ("all",)]'),
    "padded subtasks": _reply("[1,0]", '["  Solve the problem. ", "\\nCheck the answer."]', '[[],["all"]]'),
}


@pytest.mark.parametrize("text", WELL_FORMED.values(), ids=WELL_FORMED.keys())
def test_well_formed_replies_parse_to_the_same_plan(text: str):
    assert _plan(text) == TWO_STEPS


def test_last_occurrence_of_each_list_wins():
    draft = _reply("[2]", '["Do it all."]', "[[]]")
    final = _reply("[1, 0]", '["Solve the problem.", "Check the answer."]', '[[], ["all"]]')
    assert _plan(f"First idea:\n{draft}\nBetter:\n{final}") == TWO_STEPS
    # Each list on its own: a later model_id overrides the earlier one even after the other two lists.
    text = f'{final}\nOn second thought, model_id = [2, 2]\nsubtasks: ["A.", "B."]'
    assert _plan(text) == Plan((Step(2, "A.", False), Step(2, "B.", True)))


def test_quotes_inside_subtasks_do_not_end_the_list():
    text = _reply("[0]", r"""['Say "]" then it\'s done \\', "a [bracket"]""", '[[], ["all"]]')
    assert parse_workflow(text, 3).error is not None  # 2 subtasks for 1 worker: read all of it, not just 'Say "'
    plan = _plan(_reply("[0, 1]", r"""['Say "]" then it\'s done \\', "a [bracket"]""", '[[], ["all"]]'))
    assert [s.subtask for s in plan.steps] == ['Say "]" then it\'s done \\', "a [bracket"]


def test_three_empty_lists_accept():
    for text in (_reply("[]", "[]", "[]"), "I agree.\nmodel_id: []\nsubtasks: []\naccess_list: []"):
        parsed = parse_workflow(text, 3)
        assert parsed.accepts and parsed.plan is None and not parsed.malformed


# --- malformed replies ---------------------------------------------------------------------------------------------

OK_SUBTASKS, OK_ACCESS = '["Solve the problem.", "Check the answer."]', '[[], ["all"]]'
MALFORMED = {
    "empty": "",
    "prose only": "I would ask Model 1 to solve it and Model 0 to check.",
    "missing access_list": 'model_id = [1, 0]\nsubtasks = ["a", "b"]',
    "not a list": 'model_id = 1\nsubtasks = ["a"]\naccess_list = [[]]',
    "unparsable": _reply("[1, 0", "[Solve the problem, Check]", OK_ACCESS),
    "variable names": _reply("[a, b]", OK_SUBTASKS, OK_ACCESS),
    "unequal lengths": _reply("[1, 0, 2]", OK_SUBTASKS, OK_ACCESS),
    "unequal access": _reply("[1, 0]", OK_SUBTASKS, '[["all"]]'),
    "negative id": _reply("[1, -1]", OK_SUBTASKS, OK_ACCESS),
    "id = pool size": _reply("[1, 3]", OK_SUBTASKS, OK_ACCESS),
    "bool id": _reply("[True, 0]", OK_SUBTASKS, OK_ACCESS),
    "float id": _reply("[1.0, 0]", OK_SUBTASKS, OK_ACCESS),
    "inf id": _reply("[1e999, 0]", OK_SUBTASKS, OK_ACCESS),
    "name id": _reply('["Model 1", 0]', OK_SUBTASKS, OK_ACCESS),
    "superscript digit id": _reply('["\u00b2", 0]', OK_SUBTASKS, OK_ACCESS),
    "5000-digit string id": _reply(f'["{"9" * 5000}", 0]', OK_SUBTASKS, OK_ACCESS),
    "huge hex id": _reply(f"[0x{'f' * 5000}, 0]", OK_SUBTASKS, OK_ACCESS),
    "huge hex subtask": _reply("[1, 0]", f'["a", 0x{"f" * 5000}]', OK_ACCESS),
    "huge hex access": _reply("[1, 0]", OK_SUBTASKS, f"[[], [0x{'f' * 5000}]]"),
    "subtask not a string": _reply("[1, 0]", '["Solve.", 42]', OK_ACCESS),
    "access to itself": _reply("[1, 0]", OK_SUBTASKS, "[[], [1]]"),  # indices name earlier steps only
    "access word": _reply("[1, 0]", OK_SUBTASKS, '[[], ["some"]]'),
    "access None": _reply("[1, 0]", OK_SUBTASKS, "[[], None]"),
    "access all and more": _reply("[1, 0]", OK_SUBTASKS, '[[], ["all", 0]]'),
    "access nested": _reply("[1, 0]", OK_SUBTASKS, '[[], [["all"]]]'),
    "access dict": _reply("[1, 0]", OK_SUBTASKS, '[[], {"all": 1}]'),
    "unhashable dict key": _reply("[1, 0]", OK_SUBTASKS, "[[], {[1]: 2}]"),
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_replies(text: str):
    parsed = _malformed(text)
    assert len(parsed.error) < 400


def test_too_many_steps():
    six = _reply(str([0] * 6), str(["Solve."] * 6), str([[]] * 6))
    assert "more than 5" in _malformed(six).error
    assert _plan(six, max_steps=6).steps == (Step(0, "Solve.", False),) * 6
    three = _reply("[0, 1, 2]", '["a", "b", "c"]', "[[], [], []]")
    assert "more than 2" in _malformed(three, max_steps=2).error


def test_unknown_worker_depends_on_pool_size():
    text = _reply("[2]", '["Solve."]', "[[]]")
    assert _plan(text, num_workers=3).steps[0].worker == 2
    assert "unknown worker 2" in _malformed(text, num_workers=2).error


# --- replies that try to run code ----------------------------------------------------------------------------------

PAYLOADS = (
    "__import__('os').system('touch {f}')",
    "(lambda: __import__('os').system('touch {f}'))()",
    "exec(\"open('{f}', 'w')\")",
    "open('{f}', 'w').write('x')",
    "open('/etc/passwd').read()",
    "f\"{{__import__('os').system('touch {f}')}}\"",
    "().__class__.__bases__[0].__subclasses__()",
    "[x for x in ().__class__.__mro__[1].__subclasses__() if open('{f}', 'w')]",
    "{{open('{f}', 'w'): 1}}",
    "__builtins__",
    "breakpoint()",
)


@pytest.mark.parametrize("slot", ["model_id", "subtasks", "access_list"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_in_a_reply_is_never_run(tmp_path: Path, payload: str, slot: str):
    pwned = tmp_path / "pwned"
    lists = {"model_id": "[1, 0]", "subtasks": OK_SUBTASKS, "access_list": OK_ACCESS}
    lists[slot] = f"[{payload.format(f=pwned)}, 0]" if slot != "access_list" else f"[[], {payload.format(f=pwned)}]"
    _malformed(_reply(lists["model_id"], lists["subtasks"], lists["access_list"]))
    _malformed(_reply(lists["model_id"], lists["subtasks"], lists["access_list"]).replace("=", ":"))
    assert not pwned.exists()


def test_code_as_a_string_is_just_a_subtask(tmp_path: Path):
    pwned = tmp_path / "pwned"
    code = f"__import__('os').system('touch {pwned}')"
    plan = _plan(_reply("[0]", repr([code]), "[[]]"))
    assert plan.steps[0].subtask == code
    assert worker_thread(PROBLEM, plan, 0, [None])[-1]["content"].endswith(code)
    assert not pwned.exists()


@pytest.mark.parametrize("junk", ["[" * 10000, "[" * 10000 + "]" * 10000, "[" * 150 + "0" + "]" * 150,
                                  "(" * 10000, "[" + "0, " * 20000 + "]", "[" + "1" * 100000 + "]"])
@pytest.mark.parametrize("slot", ["model_id", "subtasks", "access_list"])
def test_huge_or_deep_lists_are_malformed_and_do_not_raise(junk: str, slot: str):
    lists = {"model_id": "[1, 0]", "subtasks": OK_SUBTASKS, "access_list": OK_ACCESS, slot: junk}
    _malformed(_reply(lists["model_id"], lists["subtasks"], lists["access_list"]))


# --- rounds and what a step sees -----------------------------------------------------------------------------------

def _steps(*access: bool) -> Plan:
    return Plan(tuple(Step(i % 2, f"Task {i}.", sees) for i, sees in enumerate(access)))


def test_waves():
    assert waves(_steps(False)) == [0]
    assert waves(_steps(True)) == [0]  # the first step has nothing to wait for
    assert waves(_steps(False, False, False)) == [0, 0, 0]
    assert waves(_steps(False, True, True)) == [0, 1, 2]
    assert waves(_steps(False, False, True, False, True)) == [0, 0, 1, 0, 2]
    assert waves(TWO_STEPS) == [0, 1]


def test_worker_thread_of_a_three_step_plan():
    plan = Plan((Step(0, "Solve the problem.", False), Step(1, "Answer the question.", False),
                 Step(2, "Check the work so far and give the final answer.", True)))
    question = first_turn_message(PROBLEM)
    assert worker_message(PROBLEM, "Solve the problem.") == f"{question}\nSolve the problem."
    assert worker_message(PROBLEM, "") == question
    responses = ["It is 7.", None, "unused"]
    assert worker_thread(PROBLEM, plan, 0, responses) == [
        {"role": "user", "content": f"{question}\nSolve the problem."}]
    assert worker_thread(PROBLEM, plan, 1, responses) == [  # access []: sees no earlier step
        {"role": "user", "content": f"{question}\nAnswer the question."}]
    assert worker_thread(PROBLEM, plan, 2, responses) == [  # access ["all"]: both earlier steps, never its own
        {"role": "user", "content": f"{question}\nSolve the problem."},
        {"role": "assistant", "content": "It is 7."},
        {"role": "user", "content": "Answer the question."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Check the work so far and give the final answer."},
    ]


def test_worker_thread_sees_nothing_after_a_blind_step():
    plan = _steps(False, True, False)
    assert worker_thread(PROBLEM, plan, 2, ["a", "b", None]) == [
        {"role": "user", "content": worker_message(PROBLEM, "Task 2.")}]
    assert [m["content"] for m in worker_thread(PROBLEM, plan, 1, ["a", None, None])] == [
        worker_message(PROBLEM, "Task 0."), "a", "Task 1."]


# --- reward and baselines ------------------------------------------------------------------------------------------

def test_conductor_reward():
    good, bad = parse_workflow(WELL_FORMED["plain"], 3), parse_workflow("no plan", 3)
    assert conductor_reward(bad, correct=True) == 0.0
    assert conductor_reward(bad, correct=False) == 0.0
    assert conductor_reward(good, correct=False) == 0.5
    assert conductor_reward(good, correct=True) == 1.0
    assert conductor_reward(parse_workflow(_reply("[]", "[]", "[]"), 3), correct=True) == 1.0


@pytest.mark.parametrize("num_workers,max_steps", [(1, 1), (1, 5), (3, 5), (7, 3)])
def test_random_plan_is_well_formed_and_round_trips(num_workers: int, max_steps: int):
    rng = random.Random(num_workers * 100 + max_steps)
    sizes = set()
    for _ in range(300):
        plan = random_plan(num_workers, rng, max_steps)
        sizes.add(len(plan.steps))
        assert 1 <= len(plan.steps) <= max_steps
        assert all(0 <= s.worker < num_workers and s.subtask in SUBTASKS for s in plan.steps)
        assert not plan.steps[0].sees_all
        assert parse_workflow(plan.lists(), num_workers, max_steps) == Parsed(plan)
    assert sizes == set(range(1, max_steps + 1))
    assert random_plan(3, random.Random(1)) == random_plan(3, random.Random(1))


def test_lists_round_trips_awkward_subtasks():
    plan = Plan((Step(0, 'It\'s "quoted" and ends in \\', False), Step(1, "[not] a 'list' = [1]", True)))
    assert plan.lists().startswith("model_id = [0, 1]\nsubtasks = [")
    assert parse_workflow(plan.lists(), 2) == Parsed(plan)


def test_single_step():
    plan = single_step(2)
    assert plan == Plan((Step(2, SUBTASKS[0], False),))
    assert waves(plan) == [0]
    assert worker_thread(PROBLEM, plan, 0, [None]) == [
        {"role": "user", "content": f"{first_turn_message(PROBLEM)}\n{SUBTASKS[0]}"}]
    assert parse_workflow(plan.lists(), 3) == Parsed(plan)


def test_conductor_message_hides_names():
    message = conductor_message("What is 3 + 4?", 3, examples=["model_id = [0]"])
    assert "Workers: Model 0, Model 1, Model 2\n" in message
    assert message.startswith("Example:\nmodel_id = [0]\n\n") and "Question: What is 3 + 4?" in message
    assert conductor_message("What is 3 + 4?", 3, cards=["", "", ""]) == conductor_message("What is 3 + 4?", 3)


def _cards_line(message: str) -> list[str]:
    return message.split("\nCards: ")[1].split("\n")[0].split("; ")


def test_conductor_message_lists_who_holds_each_card_in_an_order_shuffled_per_question():
    """One entry per carded worker; which comes first depends on the question, not on the pool's order, and is the
    same every time a question is asked (every sample of a GRPO group sees one prompt)."""
    cards = ["multiplies", "", "adds", "multiplies"]
    message = conductor_message("What is 3 + 4?", 4, cards=cards)
    assert "Workers: Model 0, Model 1, Model 2, Model 3\nCards: " in message
    entries = ["adds=Model 2", "multiplies=Model 0", "multiplies=Model 3"]
    assert sorted(_cards_line(message)) == entries
    assert conductor_message("What is 3 + 4?", 4, cards=cards) == message
    assert {_cards_line(conductor_message(f"What is {i} + 4?", 4, cards=cards))[0] for i in range(30)} == set(entries)


def test_a_replan_earns_what_it_changes_or_the_papers_discounted_share():
    """Standing rewards: a right first answer (1), a re-plan that broke it (0.5), then one that fixed it (1)."""
    assert turn_rewards([1.0, 0.5, 1.0], 3) == [1.0, 0.0, 0.5]  # the final outcome minus accepting's
    assert turn_rewards([0.5, 1.0], 2) == [0.5, 0.5] and turn_rewards([0.5, 0.5], 2) == [0.5, 0.0]  # accepting: 0
    assert turn_rewards([1.0, 0.5], 2) == [1.0, -0.5]  # a re-plan that breaks a right answer loses
    assert turn_rewards([0.5, 1.0], 2, "discounted") == [0.75 * 0.5 + 0.25 * 1.0, 1.0]
    assert turn_rewards([0.0], 1) == turn_rewards([0.0], 1, "discounted") == [0.0]


def test_access_lists_name_earlier_steps_by_index():
    """The paper's access lists: a step may see chosen earlier steps ([0, 2]); it waits only for those, sees only
    those, and a list naming itself or a later step is malformed."""
    text = _reply("[0, 1, 2, 0]", '["a", "b", "c", "d"]', '[[], [], [0], [0, 2]]')
    plan = _plan(text)
    assert [s.seen(i) for i, s in enumerate(plan.steps)] == [[], [], [0], [0, 2]]
    assert waves(plan) == [0, 0, 1, 2]
    thread = worker_thread(PROBLEM, plan, 3, ["A", "B", "C", None])
    assert [m["content"] for m in thread if m["role"] == "assistant"] == ["A", "C"]
    assert parse_workflow(plan.lists(), 3) == Parsed(plan)  # written back as it was read
    for bad in ('[[], [1], [], []]', '[[], [], [5], []]', '[[], [], ["0"], []]'):
        assert parse_workflow(_reply("[0, 1, 2, 0]", '["a", "b", "c", "d"]', bad), 3).malformed


def test_stable_ids_list_the_pool_in_its_order_and_the_parser_takes_only_those():
    """A pool of workers 3 and 1 (the paper's way): the prompt lists their own numbers in the drawn order, their
    cards beside them; a plan may ask 3 or 1 and nothing else, not even an id a smaller pool would have had."""
    message = conductor_message("What is 3 + 4?", [3, 1], cards=["adds", "multiplies"])
    assert "Workers: Model 3, Model 1\nCards: " in message
    assert sorted(_cards_line(message)) == ["adds=Model 3", "multiplies=Model 1"]
    assert conductor_message("What is 3 + 4?", [0, 1, 2]) == conductor_message("What is 3 + 4?", 3)
    asks = [_reply(f"[{i}]", '["Solve the problem."]', "[[]]") for i in (3, 1, 0, 2)]
    assert [parse_workflow(text, [3, 1]).plan.steps[0].worker for text in asks[:2]] == [3, 1]
    for text in asks[2:]:
        assert parse_workflow(text, [3, 1]).error.endswith("(the pool has 3, 1)")


@pytest.mark.parametrize(("malformed", "correct", "penalty", "reward"), [
    (False, True, 0.3, 0.7), (False, False, 0.3, 0.2),  # the cost comes off either
    (False, False, 0.75, -0.25),  # a wrong answer that cost much ends below a malformed plan
    (True, True, 0.3, 0.0), (True, False, 0.0, 0.0),  # a malformed plan earns 0, whatever it cost
])
def test_the_reward_pays_for_the_workflows_cost(malformed, correct, penalty, reward):
    parsed = parse_workflow("no lists here", 2) if malformed else parse_workflow(WELL_FORMED["plain"], 2)
    assert parsed.malformed is malformed
    assert conductor_reward(parsed, correct, penalty) == pytest.approx(reward)
