"""The verifier actor (rules, timeouts, failures) and the learned verifier trained on the team's answers."""

import numpy as np
import pytest
from conftest import OTHER_KERNELS, compose_config

from mapoco.config import VerifierConfig
from mapoco.rollout.learned_verifier import Example, auc, balance
from mapoco.rollout.verifier import VerifierClient, VerifyItem

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
        assert client.checker_restarts() == 1  # the process stuck on the hung sample was killed
        assert client.actor_restarts == 0
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


def fit_parity() -> tuple[list[float], float, float]:
    """Losses, and AUC before and after, of the learned verifier fitted to a label the last answer token decides
    (parity)."""
    from mapoco.models.registry import resolve_model
    from mapoco.rollout.learned_verifier import LearnedVerifier, evaluate_verifier, fit

    examples = [Example(f"{a}{b}", f"Calculate {a} + {b}.", f"\\boxed{{{n}}}", int(n % 2 == 0))
                for a in range(10) for b in range(10) for n in (a + b, a + b + 1)]
    verifier = LearnedVerifier.from_base(resolve_model("tiny-qwen"), seed=0)
    untrained = evaluate_verifier(verifier, examples, batch_size=64)
    losses = fit(verifier, examples, epochs=10, lr=1e-3, batch_size=8, seed=0)
    return losses, untrained["auc"], evaluate_verifier(verifier, examples, batch_size=64)["auc"]


@pytest.mark.kernels
def test_fit_learns_a_label_the_backbone_can_see(ray_session):
    """The training loop itself works: parity is learned to AUC ~1, on this CPU's kernels (here) and on PyTorch's
    non-vectorized ones (a Ray task with OTHER_KERNELS, as another CPU sums)."""
    import sys

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker cannot import this test module
    elsewhere = ray.remote(fit_parity).options(runtime_env={"env_vars": OTHER_KERNELS}).remote()
    for losses, untrained, trained in (fit_parity(), ray.get(elsewhere)):
        assert losses[-1] < 0.1 < losses[0] and not np.isnan(untrained)
        assert trained > 0.95 > untrained


def test_train_verifier_end_to_end(hetero_team, tmp_path):
    """Sample from the team, balance, split by question, fit, save; the verifier actor then serves the saved model.

    Held-out quality is reported, not asserted: the tiny models cannot judge arithmetic (AUC ~0.5, README).
    """
    from mapoco.rollout.learned_verifier import LearnedVerifier
    from mapoco.training.verifier_training import train_verifier

    cfg = compose_config("team=tiny_hetero", "command=train-verifier", "verifier=learned", "task.limit=200",
                         "turns=2", "verifier.epochs=1")
    report = train_verifier(cfg, tmp_path, team=hetero_team)
    assert report["held_out_examples"] >= 40 and report["train_examples"] >= 4 * report["held_out_examples"] // 2
    assert len(report["losses"]) == 1 and np.isfinite(report["losses"][0])
    # Before and after score the same held-out examples, and fitting changed what they say.
    held_out = report["held_out_examples"]
    assert report["held_out"]["num_examples"] == report["held_out_before"]["num_examples"] == held_out
    assert report["held_out"] != report["held_out_before"]
    items = [VerifyItem("Calculate 2 + 3.", "\\boxed{5}", "5"), VerifyItem("Calculate 2 + 3.", "\\boxed{7}", "5")]
    local = LearnedVerifier.load(report["path"]).score([(i.question, i.response) for i in items])
    client = VerifierClient(VerifierConfig(kind="learned", path=report["path"]))
    try:
        verdicts = client.score(items)
    finally:
        client.shutdown()
    assert [v.score for v in verdicts] == pytest.approx(local, abs=1e-5)
    assert all(0 < v.score < 1 for v in verdicts) and [v.correct for v in verdicts] == [True, False]
