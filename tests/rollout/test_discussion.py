"""A real discussion: vLLM engines in Ray actors, the rule verifier actor, MAPoRL rewards and metrics."""

import pytest

from mapoco.config import DiscussionConfig
from mapoco.rollout.discussion import run_discussion
from mapoco.tasks import TaskConfig, load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def discussion(hetero_team, rule_verifier):
    problems = load_task(TaskConfig(limit=16)).problems
    return run_discussion(hetero_team, problems, 3, DiscussionConfig(show_scores=True), rule_verifier, seed=0)


def test_every_agent_answers_every_turn(discussion):
    assert len(discussion.records) == 16 * 2 * 3
    for (q, a, t), record in discussion.records.items():
        assert record.agent == a and record.turn == t + 1
        assert record.token_ids and len(record.logprobs) == len(record.token_ids)
        assert all(lp <= 0 for lp in record.logprobs)
        assert record.score in (0.0, 1.0) and record.score == float(record.correct)


def test_recorded_token_ids_decode_to_recorded_text(discussion, hetero_team):
    for (q, a, t), record in discussion.records.items():
        tokenizer = hetero_team.agents[a].tokenizer
        assert tokenizer.decode(record.token_ids, skip_special_tokens=True) == record.text


def test_later_turn_prompts_contain_peer_answers_and_scores(discussion, hetero_team):
    for (q, a, t), record in discussion.records.items():
        if t == 0:
            continue
        prompt = hetero_team.agents[a].tokenizer.decode(record.prompt_ids)
        peer = discussion.records[(q, 1 - a, t - 1)]
        assert f"Agent {2 - a} (verifier score {peer.score:.2f}): {peer.text.strip()}" in prompt
        own_previous = discussion.records[(q, a, t - 1)]
        assert own_previous.text.strip() in prompt  # the agent's own thread carries its earlier answer


def test_turn_one_is_independent(discussion, hetero_team):
    for (q, a, t), record in discussion.records.items():
        if t == 0:
            assert "Agent" not in hetero_team.agents[a].tokenizer.decode(record.prompt_ids)


def test_same_seed_same_discussion(hetero_team, rule_verifier, discussion):
    """Seeds are keyed by (question, agent, turn), so a sub-batch reproduces the same samples."""
    problems = discussion.problems[:4]
    again = run_discussion(hetero_team, problems, 1, DiscussionConfig(show_scores=True), rule_verifier, seed=0)
    for (q, a, t), record in again.records.items():
        assert record.token_ids == discussion.records[(q, a, t)].token_ids

