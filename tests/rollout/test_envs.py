"""DiscussionEnv: RLlib's own env checker, canned episodes (prompts, rewards, infos), and the engines' episode."""

import numpy as np
import pytest
from ray.rllib.utils.pre_checks.env import check_multiagent_environments

from mapoco.config import DiscussionConfig, RewardConfig
from mapoco.rollout.prompts import PeerAnswer, first_turn_message, later_turn_message
from mapoco.rollout.rewards import maporl_rewards
from mapoco.rollout.rllib_env import (
    AnyText,
    DiscussionEnv,
    chat_template_renderer,
    play_episode,
)
from mapoco.rollout.verifier import Verdict, VerifyItem, check_gold
from mapoco.tasks import Problem

PROBLEMS = [Problem("q0", "Calculate 2 + 3.", "5"), Problem("q1", "Calculate 4 - 1.", "3"),
            Problem("q2", "Calculate 1 + 1.", "2")]
INCENTIVES = RewardConfig(alpha0=0.5, alpha1=1.0, beta0=0.25, beta1=0.5)


class InlineVerifier:
    """The rule verifier's gold check, in-process (the Ray actor is not needed to test the env)."""

    def __init__(self):
        self.calls: list[list[Verdict]] = []

    def score(self, items: list[VerifyItem]) -> list[Verdict]:
        verdicts = [Verdict(float(ok), ok) for ok in map(check_gold, items)]
        self.calls.append(verdicts)
        return verdicts


class TableVerifier:
    """Scores answers from a table: fractional scores, and a flagged sample (score None)."""

    def __init__(self, table: dict[str, float | None]):
        self.table = table

    def score(self, items: list[VerifyItem]) -> list[Verdict]:
        return [Verdict(None, False, "boom") if self.table[i.response] is None
                else Verdict(self.table[i.response], self.table[i.response] > 0.5) for i in items]


def test_rllib_env_checker_passes():
    env = DiscussionEnv(PROBLEMS, InlineVerifier(), num_agents=3, turns=2)
    assert hasattr(env, "_agent_ids") and env.observation_space is not None  # else the checker only warns
    for space in env.action_spaces.values():
        space.seed(0)
    check_multiagent_environments(env)
    assert env.turn == 1 and len(env.verifier.calls) == 1  # the checker reset the env and stepped it once


def test_spaces_hold_any_text():
    space = AnyText(50)
    assert space.contains("") and space.contains("héllo 😀 \ufffd\n\\boxed{5}") and not space.contains("x" * 51)
    assert not space.contains(5) and isinstance(space.sample(), str) and len(space.sample()) <= 50


def test_canned_episode_prompts_rewards_and_infos():
    env = DiscussionEnv(PROBLEMS, InlineVerifier(), num_agents=2, turns=3,
                        discussion=DiscussionConfig(show_scores=True), rewards=INCENTIVES)
    obs, infos = env.reset(options={"problem": 0})
    problem = PROBLEMS[0]
    first = first_turn_message(problem)
    assert obs == {"agent_0": f"User: {first}", "agent_1": f"User: {first}"}
    assert infos["agent_1"]["messages"] == [{"role": "user", "content": first}]
    assert all(env.observation_spaces[a].contains(o) for a, o in obs.items())

    answers = [("\\boxed{5}", "\\boxed{4}"), ("I keep \\boxed{5}", "Agent 1 is right: \\boxed{5}"),
               ("\\boxed{5}", "\\boxed{6}")]
    rewards_seen = []
    for t, (a0, a1) in enumerate(answers):
        obs, rewards, terminateds, truncateds, infos = env.step({"agent_0": a0, "agent_1": a1})
        rewards_seen.append(rewards)
        assert terminateds["__all__"] == (t == 2) and not truncateds["__all__"]
        assert infos["agent_1"]["turn"] == t + 1 and infos["agent_1"]["answer"] == a1[-2]
        assert infos["agent_1"]["correct"] == (a1[-2] == "5")
        if t == 0:  # turn 2's prompt: the agent's own answer, then its peer's answer with its score
            later = later_turn_message(problem, [PeerAnswer(1, a1, 0.0)])
            assert obs["agent_0"] == f"User: {first}\n\nAssistant: {a0}\n\nUser: {later}"
            assert "Agent 2 (verifier score 0.00): \\boxed{4}" in obs["agent_0"]
            assert "Agent 1 (verifier score 1.00): \\boxed{5}" in obs["agent_1"]
            assert infos["agent_0"]["messages"][-1] == {"role": "user", "content": later}

    scores = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    # By hand, gamma 0.3, team mean per turn 0.5, 1, 0.5: R(a, 1) = (V + 0.3 * 1 + 0.09 * 0.5) / 1.39, R(a, 2) =
    # (V + 0.3 * 0.5) / 1.3, R(a, 3) = V. Incentives: agent_0 kept its right answer against agent_1's wrong one at
    # turn 2 (alpha0 0.5) and its turn-1 answer turned the wrong agent_1 right (beta1 0.5); agent_1 was persuaded
    # at turn 2 (alpha1 1.0). Its turn-3 cave earns nothing: no incentive punishes it in the paper's form.
    expected = np.array([[1.345 / 1.39 + 0.5, 1.15 / 1.3 + 0.5, 1.0], [0.345 / 1.39, 1.15 / 1.3 + 1.0, 0.0]])
    assert [r["agent_0"] for r in rewards_seen[:2]] == [0.0, 0.0]  # the reward of turn t needs later turns
    for i, a in enumerate(env.agents):
        assert rewards_seen[2][a] == pytest.approx(expected[i].sum())
        assert infos[a]["maporl_rewards"] == pytest.approx(expected[i])
    assert np.array_equal(env.result.grid("score", float)[0], scores)
    with pytest.raises(RuntimeError, match="reset"):
        env.step({"agent_0": "1", "agent_1": "2"})


def test_fractional_and_flagged_scores_and_ring_topology():
    table = {"a": 0.2, "b": 0.9, "c": 0.95, "x": 0.1, "y": 0.3, "z": 0.85, "f": None, "r": 0.6}
    env = DiscussionEnv(PROBLEMS, TableVerifier(table), num_agents=3, turns=3, shuffle=False,
                        discussion=DiscussionConfig(topology="ring"), rewards=RewardConfig(gamma=0.3))
    env.reset()
    for actions in (("a", "x", "f"), ("b", "y", "r"), ("c", "z", "r")):
        obs, rewards, _, _, infos = env.step(dict(zip(env.agents, actions)))
        if actions[0] == "a":  # ring: agent_1 sees only agent_0's answer
            assert "Agent 1: a" in obs["agent_1"] and "Agent 3" not in obs["agent_1"]
            assert infos["agent_2"]["score"] is None and infos["agent_2"]["error"] == "boom"
    # The flagged turn-1 answer leaves the team mean (0.15 = (0.2 + 0.1) / 2) and earns 0 itself. By hand, gamma 0.3:
    # agent_0: (0.2 + 0.3 * 0.6 + 0.09 * 0.8) / 1.39 + (0.9 + 0.3 * 0.8) / 1.3 + 0.95, and so on.
    expected = [0.452 / 1.39 + 1.14 / 1.3 + 0.95, 0.352 / 1.39 + 0.54 / 1.3 + 0.85, 0.0 + 0.84 / 1.3 + 0.6]
    assert [rewards[a] for a in env.agents] == pytest.approx(expected)


def test_questions_cycle_and_reset_seed_repeats():
    env = DiscussionEnv(PROBLEMS, InlineVerifier(), turns=1)
    seen = [env.reset(seed=3)[1]["agent_0"]["question_id"]]
    seen += [env.reset()[1]["agent_0"]["question_id"] for _ in range(2)]
    assert sorted(seen) == ["q0", "q1", "q2"]
    assert env.reset(seed=3)[1]["agent_0"]["question_id"] == seen[0]
    assert env.reset(options={"problem": 2})[1]["agent_0"]["question_id"] == "q2"
    assert env.reset()[1]["agent_0"]["question_id"] == seen[1]  # an explicit question leaves the cycle alone
    env.reset()
    with pytest.raises(ValueError, match="missing \\['agent_1'\\]"):
        env.step({"agent_0": "1"})


@pytest.mark.slow
def test_engine_episode_matches_run_discussion(hetero_team, rule_verifier):
    from mapoco.rollout.discussion import run_discussion
    from mapoco.tasks import TaskConfig, load_task

    problems = load_task(TaskConfig(limit=2)).problems
    cfg = DiscussionConfig(show_scores=True)
    reference = run_discussion(hetero_team, problems, 3, cfg, rule_verifier, seed=5)
    scores = np.nan_to_num(reference.grid("score", float), nan=0.0)
    correct = reference.grid("correct", bool)
    env = DiscussionEnv(problems, rule_verifier, num_agents=2, turns=3, discussion=cfg, rewards=INCENTIVES, seed=5,
                        render=chat_template_renderer(hetero_team))
    for q in range(len(problems)):
        returns, infos = play_episode(env, hetero_team, options={"problem": q})
        expected = maporl_rewards(scores[q], correct[q], INCENTIVES)
        for a, runtime in enumerate(hetero_team.agents):
            assert returns[f"agent_{a}"] == pytest.approx(expected[a].sum())
            assert infos[f"agent_{a}"]["maporl_rewards"] == pytest.approx(expected[a])
            for t in range(3):
                record, mine = reference.records[(q, a, t)], env.result.records[(0, a, t)]
                assert (mine.text, mine.score, mine.answer) == (record.text, record.score, record.answer)
                # the observation of turn t is the text of the engine's prompt at turn t
                text = env.render_thread(a, env.threads[a][: 2 * t + 1])
                assert runtime.tokenizer.encode(text, add_special_tokens=False) == record.prompt_ids
