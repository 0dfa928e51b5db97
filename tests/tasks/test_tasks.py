import re

import pytest
from conftest import ROOT

from mapoco.answers import extract_answer, is_correct
from mapoco.tasks import (
    TaskConfig,
    TaskDataError,
    arithmetic_problems,
    composition_problems,
    load_task,
    number_problems,
    straight_line_program_answer,
)

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


def test_arithmetic_is_seeded_and_splits_differ():
    cfg = TaskConfig()
    first, again = arithmetic_problems(cfg, "test", 20), arithmetic_problems(cfg, "test", 20)
    assert first == again
    train = {p.question for p in arithmetic_problems(cfg, "train", 20)}
    assert train != {p.question for p in first}
    for p in first:
        assert is_correct(p.gold, p.gold, "math")


def test_composition_splits_are_disjoint_and_the_gold_needs_both_operations():
    splits = {split: composition_problems(split) for split in ("train", "validation", "test")}
    assert {split: len(problems) for split, problems in splits.items()} == {"train": 300, "validation": 76,
                                                                           "test": 200}
    questions = [{p.question for p in problems} for problems in splits.values()]
    assert sum(map(len, questions)) == 576 == len(set.union(*questions))  # every a * b + c once, in one split
    assert splits["test"][0].question == "Calculate 6 * 9 + 6." and splits["test"][0].gold == "60"
    for problem in splits["test"]:
        a, b, c = map(int, re.fullmatch(r"Calculate (\d) \* (\d) \+ (\d)\.", problem.question).groups())
        assert int(problem.gold) == a * b + c != a * b and min(a, b) >= 2 and c >= 1
    assert load_task(TaskConfig(name="composition", limit=5)).problems == splits["test"][:5]


def test_number_splits_are_disjoint_the_kinds_take_turns_and_the_gold_is_right():
    splits = {split: number_problems(split) for split in ("train", "validation", "test")}
    questions = [{p.question for p in problems} for problems in splits.values()]
    assert sum(map(len, questions)) == 2 * 9000 == len(set.union(*questions))  # every question once, in one split
    test = splits["test"]
    assert [p.id.split("-")[1] for p in test[:4]] == ["first_digit", "last_digit"] * 2
    for problem in test:
        which, number = re.fullmatch(r"What is the (first|last) digit of (\d{4})\?", problem.question).groups()
        assert problem.gold == number[0 if which == "first" else -1]
    cfg = TaskConfig(name="numbers", limit=6, params={"kinds": ["last_digit"]})
    assert load_task(cfg).problems == number_problems("test", ["last_digit"])[:6]


def test_gsm8k_local_file_matches_hub_format():
    data = load_task(TaskConfig(name="gsm8k", path=str(GSM8K / "test.jsonl"), limit=5))
    assert len(data.problems) == 5 and data.skipped == 0
    assert data.problems[0].gold == "18"


def test_rows_without_gold_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q1", "answer": "x #### 3"}\n{"question": "q2", "answer": "no marker"}\n'
                    '{"question": "q3"}\n')
    data = load_task(TaskConfig(name="gsm8k", path=str(path)))
    assert [p.gold for p in data.problems] == ["3"] and data.skipped == 2


def test_malformed_json_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"question": "q1", "answer": "x #### 3"}\n{"question": "q2", "answer": \n[1, 2]\n\n'
                    '{"question": "q3", "answer": "y #### 4"}\n')
    data = load_task(TaskConfig(name="gsm8k", path=str(path)))
    assert [p.gold for p in data.problems] == ["3", "4"] and data.skipped == 2


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "", "the file is empty"),
    ("garbage.jsonl", "not json\n{broken\n", "no usable gsm8k problem in it (2 rows skipped"),
    ("other_task.jsonl", '{"premise": "P", "hypothesis": "H", "label": 0}\n', "no usable gsm8k problem"),
    ("bad.parquet", "not parquet", "cannot be read as parquet"),
])
def test_unusable_files_are_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskDataError, match=re.escape(f"task.path={path}: {message}")):
        load_task(TaskConfig(name="gsm8k", path=str(path)))


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(TaskDataError, match="task.train_path=.*nope.jsonl: no such file"):
        load_task(TaskConfig(name="gsm8k", train_path=str(tmp_path / "nope.jsonl")), split="train")


def test_anli_labels_local(tmp_path):
    path = tmp_path / "anli.jsonl"
    path.write_text('{"uid": "a", "premise": "P", "hypothesis": "H", "label": 2}\n'
                    '{"uid": "b", "premise": "P", "hypothesis": "H", "label": 7}\n')
    data = load_task(TaskConfig(name="anli", path=str(path)))
    assert data.problems[0].gold == "contradiction" and data.problems[0].kind == "nli" and data.skipped == 1
    assert extract_answer("I think it is a Contradiction.", "nli") == "contradiction"


@pytest.mark.parametrize(
    "text,expected",
    [("so \\boxed{1,234}", "1234"), ("#### 42", "42"), ("it is 7 then 9.", "9"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
     ("nothing", None)],
)
def test_extract_math(text, expected):
    assert extract_answer(text, "math") == expected


def test_math_verify_equivalence():
    assert is_correct("\\frac{1}{2}", "0.5", "math")
    assert not is_correct("3", "4", "math")
    assert not is_correct(None, "4", "math")


def test_tinygsm_programs_are_interpreted_not_executed():
    code = "def simple_math_problem():\n    '''doc'''\n    a = 5\n    b = a * 3 + 1\n    return b / 2\n"
    assert straight_line_program_answer(code) == "8"
    assert straight_line_program_answer("def f():\n    return __import__('os').system('echo hi')") is None
    assert straight_line_program_answer("def f():\n    x = 2 ** 1000\n    return x") is None
