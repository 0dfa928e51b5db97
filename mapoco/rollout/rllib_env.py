"""The MAPoRL discussion as an RLlib ``MultiAgentEnv``: one episode is one question, discussed for T turns.

``DiscussionEnv`` plugs the discussion into RLlib-based tooling (evaluation harnesses, custom multi-agent
algorithms over text). It is not how mapoco trains its LLMs: that is ``mapoco.training.trainer`` (vLLM engines and
DeepSpeed learners); RLlib never updates the models here.

- **Agents** ``agent_0`` .. ``agent_{A-1}``, all acting at every step (simultaneous moves); step t is turn t.
- **Observation** of an agent: its chat thread up to this turn, rendered as text by ``render``. The thread is
  exactly what ``run_discussion`` sends that agent: turn 1 ``first_turn_message``, later turns the agent's earlier
  answers as assistant messages and ``later_turn_message`` with its visible peers' previous answers
  (``discussion.topology``; their scores when ``discussion.show_scores``). The default ``plain_thread`` renders
  ``User: ...`` / ``Assistant: ...`` blocks; ``chat_template_renderer(team)`` renders each agent's own chat
  template, i.e. the text whose tokens are the engine's prompt. The observation after the last turn is the thread
  with the last answers.
- **Action** of an agent: its answer text.
- **Reward** (delayed, so that it sums correctly): MAPoRL's reward of turn t depends on the team's later turns, so
  every step before the last gives 0.0 and the last step gives each agent the sum over turns of
  ``maporl_rewards(scores, correct, rewards)[agent, :]``: the episode return is the agent's MAPoRL return.
  The per-turn rewards are in the last step's info (``maporl_rewards``), each turn's own verifier score in that
  step's info (``score``). Scores come from the verifier after every turn; a flagged sample scores 0 in the
  rewards, as in training.
- **Termination**: ``terminateds["__all__"]`` (and every agent's) is True after T steps; truncation never happens.
- **Infos**, per agent. About the answer just scored (every step): ``turn`` (1-based), ``answer`` (extracted),
  ``correct`` (against the gold answer), ``score`` (None: flagged), ``error``; last step also
  ``maporl_rewards``. About the next prompt (reset and every step but the last): ``messages`` (the chat thread,
  for an engine: ``AgentRuntime.render(messages)`` gives the prompt ids ``run_discussion`` would use) and
  ``request_seed`` (the per-request sampling seed ``run_discussion(seed=...)`` would use). Always
  ``question_id``.

Spaces: both are ``AnyText`` (a gymnasium ``Text``, see there): LLM answers are arbitrary Unicode, which a
finite ``Text`` charset cannot hold at a sane cost. A text longer than ``max_chars`` is an error, never an
observation or action outside its space.

Questions: ``reset(seed=s)`` seeds the question order (a permutation of ``problems`` when ``shuffle``, else their
order) and restarts it; later ``reset()`` calls take the next question, cycling. ``reset(options={"problem": i})``
plays ``problems[i]`` without moving the cycle. The constructor's ``seed`` is the run seed of the sampling seeds,
as in ``run_discussion``. For RLlib's env registry: ``register_env("discussion", lambda c: DiscussionEnv(**c))``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from mapoco.config import DiscussionConfig, RewardConfig
from mapoco.rollout.discussion import (
    DiscussionResult,
    generate_turn,
    record_turn,
    turn_message,
)
from mapoco.rollout.engine import Generation, request_seed
from mapoco.rollout.rewards import team_rewards
from mapoco.tasks import Problem

if TYPE_CHECKING:
    from mapoco.config import RunConfig
    from mapoco.rollout.discussion import Team

Messages = list[dict[str, str]]
Renderer = Callable[[int, Messages], str]  # (agent index, chat thread) -> observation text

SAMPLE_MAX_CHARS = 256


class AnyText(spaces.Text):
    """A gymnasium ``Text`` space holding every string of 0 to ``max_length`` characters, any Unicode.

    ``Text.contains`` requires each character to be in a finite charset. Model answers are arbitrary Unicode
    (byte-level tokenizers decode a cut multi-byte sequence to U+FFFD, models write emoji), and a charset of every
    code point costs about 400 MB and 13 s per space. So this ``Text`` accepts any ``str`` up to ``max_length``;
    its charset (printable ASCII, with newline) is only what ``sample()`` draws from, and ``sample()`` draws at most
    ``SAMPLE_MAX_CHARS`` characters unless a mask gives the length, so random actions stay cheap. RLlib's
    env checker and ``isinstance(space, gymnasium.spaces.Text)`` see a ``Text``; RLlib's space serialisation
    writes it back as a plain ``Text`` over that charset (narrower than this space).
    """

    def __init__(self, max_length: int, *, seed: int | np.random.Generator | None = None):
        super().__init__(max_length, min_length=0, charset=string.printable, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        if mask is None and probability is None:
            length = self.np_random.integers(0, min(self.max_length, SAMPLE_MAX_CHARS) + 1)
            mask = (length, None)
        return super().sample(mask=mask, probability=probability)

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and super().__eq__(other)

    def __repr__(self) -> str:
        return f"AnyText(0, {self.max_length})"


def plain_thread(agent: int, messages: Messages) -> str:
    """A chat thread as plain text: ``User: ...`` / ``Assistant: ...`` blocks separated by a blank line."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def chat_template_renderer(team: Team) -> Renderer:
    """Each agent's own chat template with the generation prompt: the text ``AgentRuntime.render`` tokenizes
    (it keeps only the last message when the thread no longer fits the engine's context; the text does not)."""

    def render(agent: int, messages: Messages) -> str:
        tokenizer = team.agents[agent].tokenizer
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


def agent_id(index: int) -> str:
    return f"agent_{index}"


class DiscussionEnv(MultiAgentEnv):
    """A MAPoRL discussion of one question per episode; see the module docstring for spaces, rewards, infos."""

    def __init__(
        self,
        problems: Sequence[Problem],
        verifier: Any,  # a VerifierClient, or anything with its ``score(list[VerifyItem]) -> list[Verdict]``
        num_agents: int = 2,
        turns: int = 3,
        discussion: DiscussionConfig | None = None,
        rewards: RewardConfig | None = None,
        seed: int = 0,
        shuffle: bool = True,
        render: Renderer = plain_thread,
        max_chars: int = 1_000_000,
    ):
        if not problems:
            raise ValueError("problems: need at least one question")
        if num_agents < 1 or turns < 1:
            raise ValueError(f"num_agents={num_agents}, turns={turns}: both must be >= 1")
        self.problems = list(problems)
        self.verifier = verifier
        self.num_turns = turns
        self.discussion = discussion or DiscussionConfig()
        self.reward_cfg = rewards or RewardConfig()
        self.run_seed = seed  # of the sampling seeds (not named `seed`: gym envs once had a seed() method)
        self.shuffle = shuffle
        self.render_thread = render
        self.max_chars = max_chars
        self.agents = [agent_id(i) for i in range(num_agents)]
        self.possible_agents = list(self.agents)
        self._agent_ids = set(self.agents)
        text = AnyText(max_chars)
        self.observation_spaces = {a: text for a in self.agents}
        self.action_spaces = {a: text for a in self.agents}
        self.observation_space = spaces.Dict(self.observation_spaces)
        self.action_space = spaces.Dict(self.action_spaces)
        super().__init__()
        self._order: np.ndarray | None = None
        self._cursor = 0
        self.problem: Problem | None = None
        self.result: DiscussionResult | None = None  # the current episode: every answer, score and correctness
        self.threads: list[Messages] = []
        self.turn = 0  # answers given so far in this episode

    @classmethod
    def from_run_config(cls, cfg: RunConfig, problems: Sequence[Problem], verifier: Any, **kwargs: Any):
        """The env of a run configuration: its team size, turns, discussion, rewards and seed."""
        return cls(problems, verifier, num_agents=len(cfg.team.agents), turns=cfg.turns,
                   discussion=cfg.discussion, rewards=cfg.rewards, seed=cfg.seed, **kwargs)

    # ------------------------------------------------------------------ gymnasium / RLlib API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed, options=options)
        self.problem = self.problems[self._next_index(seed, options or {})]
        self.result = DiscussionResult([self.problem], len(self.agents), self.num_turns)
        self.threads = [[] for _ in self.agents]
        self.turn = 0
        self._ask_next_turn()
        return self._observations(), {a: self._prompt_info(i) for i, a in enumerate(self.agents)}

    def step(self, action_dict: dict[str, str]):
        if self.result is None or self.turn >= self.num_turns:
            raise RuntimeError("step() after the episode ended (or before reset()): call reset() first")
        missing = [a for a in self.agents if a not in action_dict]
        unknown = [a for a in action_dict if a not in self._agent_ids]
        if missing or unknown:
            raise ValueError(f"actions: every agent answers every turn; missing {missing}, unknown {unknown}")
        for a in self.agents:
            action = action_dict[a]
            if not self.action_spaces[a].contains(action):
                got = f"{len(action)} characters" if isinstance(action, str) else type(action).__name__
                raise ValueError(f"actions[{a!r}]: must be a str of at most max_chars={self.max_chars} "
                                 f"characters, got {got}")
        generations = {
            i: [Generation(prompt_ids=[], token_ids=[], logprobs=[], text=str(action_dict[a]), finish_reason="")]
            for i, a in enumerate(self.agents)
        }
        threads = [self.threads]  # one question: record_turn indexes threads[question][agent]
        record_turn(self.result, threads, generations, self.verifier, [(0, self.turn)])  # scores; appends the answers
        self.turn += 1
        done = self.turn == self.num_turns
        infos = {a: self._answer_info(i) for i, a in enumerate(self.agents)}
        if done:
            per_turn = self.turn_rewards()
            rewards = {a: float(per_turn[i].sum()) for i, a in enumerate(self.agents)}
            for i, a in enumerate(self.agents):
                infos[a]["maporl_rewards"] = per_turn[i].tolist()
        else:
            self._ask_next_turn()
            rewards = {a: 0.0 for a in self.agents}
            for i, a in enumerate(self.agents):
                infos[a].update(self._prompt_info(i))
        terminateds = {a: done for a in self.agents} | {"__all__": done}
        truncateds = {a: False for a in self.agents} | {"__all__": False}
        return self._observations(), rewards, terminateds, truncateds, infos

    # ------------------------------------------------------------------ results
    def turn_rewards(self) -> np.ndarray:
        """MAPoRL reward per [agent, turn] of the finished episode, as in training: a flagged answer leaves the team
        mean and earns 0 itself here (training skips it)."""
        return np.nan_to_num(team_rewards(self.result, self.reward_cfg, self.discussion.topology)[0], nan=0.0)

    # ------------------------------------------------------------------ internals
    def _next_index(self, seed: int | None, options: dict) -> int:
        if "problem" in options:
            index = int(options["problem"])
            if not 0 <= index < len(self.problems):
                raise ValueError(f"options['problem']={index}: must be in [0, {len(self.problems)})")
            return index
        if seed is not None or self._order is None or self._cursor >= len(self._order):
            n = len(self.problems)
            self._order = self.np_random.permutation(n) if self.shuffle else np.arange(n)
            self._cursor = 0
        self._cursor += 1
        return int(self._order[self._cursor - 1])

    def _ask_next_turn(self) -> None:
        for i, thread in enumerate(self.threads):
            thread.append({"role": "user", "content": turn_message(self.result, 0, i, self.turn, self.discussion)})

    def _observations(self) -> dict[str, str]:
        obs = {}
        for i, a in enumerate(self.agents):
            text = self.render_thread(i, self.threads[i])
            if len(text) > self.max_chars:
                raise ValueError(f"max_chars={self.max_chars}: {a}'s observation has {len(text)} characters at "
                                 f"turn {self.turn + 1}; raise max_chars")
            obs[a] = text
        return obs

    def _prompt_info(self, agent: int) -> dict[str, Any]:
        return {
            "question_id": self.problem.id,
            "messages": [dict(m) for m in self.threads[agent]],
            "request_seed": request_seed(self.run_seed, self.problem.id, agent, self.turn),
        }

    def _answer_info(self, agent: int) -> dict[str, Any]:
        record = self.result.records[(0, agent, self.turn - 1)]
        return {"question_id": self.problem.id, "turn": record.turn, "answer": record.answer,
                "correct": record.correct, "score": record.score, "error": record.error}


def play_episode(
    env: DiscussionEnv, team: Team, seed: int | None = None, options: dict | None = None
) -> tuple[dict[str, float], dict[str, dict]]:
    """One episode with the team's engines answering: ``env.reset(seed=seed, options=options)``, then each turn
    every agent generates from ``info["messages"]`` with ``info["request_seed"]`` through ``generate_turn``, as
    ``run_discussion`` does. Returns each agent's episode return and the last
    infos; ``env.result`` holds the transcript. With the env's ``seed`` equal to ``run_discussion``'s, the same
    question samples the same answers and so gets the same rewards."""
    if len(team) != len(env.agents):
        raise ValueError(f"team has {len(team)} agents, the env {len(env.agents)}")
    _, infos = env.reset(seed=seed, options=options)
    returns = {a: 0.0 for a in env.agents}
    while True:
        seats = dict(zip((r.index for r in team.agents), env.agents))
        generations = generate_turn(team, {i: [infos[a]["messages"]] for i, a in seats.items()},
                                    {i: [infos[a]["request_seed"]] for i, a in seats.items()})
        actions = {a: generations[i][0].text for i, a in seats.items()}
        _, rewards, terminateds, _, infos = env.step(actions)
        for a, r in rewards.items():
            returns[a] += r
        if terminateds["__all__"]:
            return returns, infos
