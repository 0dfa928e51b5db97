"""The verifier actor (rules, timeouts, failures) and the learned verifier trained on the team's answers."""

import pytest

from mapoco.config import VerifierConfig
from mapoco.learned_verifier import Example, auc, balance
from mapoco.verifier import VerifierClient, VerifyItem

from conftest import compose_config

pytestmark = pytest.mark.slow

# math-verify never returns on this answer (sympy expands the tower): a real hung verifier call.
HANGS = VerifyItem("Calculate 1 + 0.", "\\boxed{9^{9^{9^{9}}}}", "1")


def test_hung_or_failing_samples_are_flagged_and_the_batch_goes_on(ray_session):
    client = VerifierClient(VerifierConfig(timeout_s=2.0))
    try:
        items = [VerifyItem("Calculate 2 + 3.", "\\boxed{5}", "5"), HANGS,
                 VerifyItem("Calculate 2 + 3.", "\\boxed{6}", "5"), VerifyItem("q", "\\boxed{5}", None)]
        verdicts = client.score(items)
        assert (verdicts[0].score, verdicts[0].correct) == (1.0, True)
        assert verdicts[1].flagged and "timed out" in verdicts[1].error
        assert (verdicts[2].score, verdicts[2].correct) == (0.0, False)
        assert verdicts[3].flagged and "TypeError" in verdicts[3].error  # a row with a broken gold answer
        assert client.restarts == 1  # the actor with the spinning thread was replaced
        assert client.score(items[:1])[0].score == 1.0
    finally:
        client.shutdown()


def test_balance_keeps_equal_right_and_wrong_per_question():
    examples = [Example("a", "q", f"r{i}", int(i < 3)) for i in range(5)] + [Example("b", "q", "x", 1)]
    kept = balance(examples, seed=0)
    assert sorted(e.label for e in kept) == [0, 0, 1, 1]  # question b (only right answers) is dropped
    assert {e.question_id for e in kept} == {"a"}


def test_auc():
    import numpy as np

    assert auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5


def test_learned_verifier_separates_right_from_wrong(hetero_team, tmp_path):
    from mapoco.learned_verifier import train_verifier

    cfg = compose_config("team=tiny_hetero", "command=train-verifier", "verifier=learned", "task.limit=200",
                         "turns=2", "verifier.epochs=4")
    report = train_verifier(cfg, tmp_path, team=hetero_team)
    assert report["held_out_examples"] >= 40
    assert report["held_out"]["auc"] > 0.6, report
    client = VerifierClient(VerifierConfig(kind="learned", path=report["path"]))
    try:
        verdict = client.score([VerifyItem("Calculate 2 + 3.", "\\boxed{5}", "5")])[0]
        assert 0 < verdict.score < 1 and verdict.correct
    finally:
        client.shutdown()
