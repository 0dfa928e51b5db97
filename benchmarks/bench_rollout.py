"""rollout_vs_engine and rollout_vs_hf_generate: a full MAPoRL discussion (A SmolLM2-135M agents, each on its own
engine, T turns over GSM8K questions, natural stopping, at most 256 new tokens) in generated tokens per second,
against

* the raw vLLM engine (the ceiling): one ``LLM`` given exactly the discussion's requests (prompt token ids, sampling
  parameters, seeds) in a single ``generate`` call, with the whole team's KV-cache budget;
* the MAPoRL reference code's way: HF ``generate`` on the same model and dtype, one agent after another, each turn
  one left-padded batch of that agent's prompts (the same prompts), sampling until every row stopped.

Prompts of later turns depend on earlier answers, so the baselines replay the prompts mapoco's discussion built:
all three sides generate for the same inputs.
"""

from __future__ import annotations

import dataclasses
import os
import time

import ray
import torch

from benchmarks.common import Figure, Result, peak_rss_mib, timed
from mapoco.cli import compose
from mapoco.config import DiscussionConfig, SamplingConfig
from mapoco.rollout.discussion import DiscussionResult, Team, run_discussion
from mapoco.rollout.engine import engine_env, request_seed
from mapoco.rollout.verifier import VerifierClient
from mapoco.runtime.precision import engine_dtype
from mapoco.tasks import load_task


@dataclasses.dataclass
class Request:
    agent: int
    turn: int
    prompt_ids: list[int]
    seed: int


class RawEngine:
    """The ceiling: a plain vLLM ``LLM`` serving a list of requests in one call."""

    def __init__(self, model_path: str, dtype: str, max_model_len: int):
        from vllm import LLM

        # vLLM's CPU sampler cannot rewind a seeded generator for a prefill split across steps: whole prefills,
        # as mapoco's engine runs them (a requirement of seeded sampling on CPU, not a tuning).
        whole_prefills = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False,
                                                               "max_num_batched_tokens": max(max_model_len, 8192)}
        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=0, enforce_eager=True,
                       **whole_prefills)

    def generate(self, requests: list[Request], sampling: SamplingConfig) -> int:
        from vllm import SamplingParams, TokensPrompt

        self.llm.reset_prefix_cache()  # every replay starts cold, as every training rollout does after a weight push
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=r.seed) for r in requests]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params,
                                    use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)


class HFGenerate:
    """MAPoRL's reference rollout: transformers ``generate``, agent after agent, a padded batch per turn."""

    def __init__(self, model_path: str, dtype: str, threads: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()

    @torch.no_grad()
    def generate(self, requests: list[Request], sampling: SamplingConfig) -> int:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id or 0
        generated = 0
        order = sorted({(r.turn, r.agent) for r in requests})
        for turn, agent in order:
            batch = [r.prompt_ids for r in requests if (r.turn, r.agent) == (turn, agent)]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      temperature=sampling.temperature, top_p=sampling.top_p,
                                      max_new_tokens=sampling.max_new_tokens, eos_token_id=eos, pad_token_id=pad)
            for row in out[:, width:].tolist():
                generated += row.index(eos) + 1 if eos in row else len(row)
        return generated


def requests_of(result: DiscussionResult, seed: int) -> list[Request]:
    return [Request(a, t, r.prompt_ids, request_seed(seed, result.problems[q].id, a, t))
            for (q, a, t), r in sorted(result.records.items())]


def team_overrides(agents: int, model: str, max_new_tokens: int) -> list[str]:
    """A team of ``agents`` copies of ``model``, each on its own engine: SmolLM2 on GSM8K, tiny models on the
    arithmetic they were warm-started on (their 1024-token context and tokenizer do not fit GSM8K)."""
    names = ",".join(f"{{name: agent_{i}, model: {model}}}" for i in range(agents))
    task = (["task=gsm8k", "task.path=../shared/data/gsm8k/test.jsonl", "engine.max_model_len=4096"]
            if model == "smollm2" else ["task=arithmetic"])
    return [f"team.agents=[{names}]", "sampling.temperature=0.7", f"sampling.max_new_tokens={max_new_tokens}", *task]


def _replay(actor: ray.actor.ActorHandle, discussions: list[list[Request]], sampling: SamplingConfig) -> list[float]:
    """Generated tok/s of ``actor`` on each discussion's requests; the actor is killed afterwards."""
    # Warm-up, untimed: one short batch pays the first call's allocations (HF generate runs a batch per agent and
    # turn, so the warm-up takes one agent's first-turn requests, and a few tokens suffice).
    first = [r for r in discussions[0] if (r.agent, r.turn) == (0, 0)][:4]
    try:
        ray.get(actor.generate.remote(first, dataclasses.replace(sampling, max_new_tokens=8)))
        rates = []
        for requests in discussions:
            start = time.perf_counter()
            tokens = ray.get(actor.generate.remote(requests, sampling))
            rates.append(tokens / (time.perf_counter() - start))
        return rates
    finally:
        ray.kill(actor)


def run(agents: int, model: str = "smollm2", questions: int = 32, turns: int = 3, max_new_tokens: int = 256,
        repeats: int = 2) -> tuple[Result, Result]:
    """Three phases, one side alive at a time (on 2 cores, idle engines of one side slowed the other down):
    mapoco's discussion ``repeats`` times with different seeds, then the raw engine and HF ``generate`` each
    replaying every one of those discussions' requests. Ratios are taken per discussion."""
    cfg = compose(*team_overrides(agents, model, max_new_tokens), f"task.limit={questions}", f"turns={turns}")
    problems = load_task(cfg.task).problems
    agent = cfg.team.agents[0]
    dtype = engine_dtype(agent.engine)
    began = time.perf_counter()
    team, verifier = Team(cfg.team, cfg.seed), VerifierClient(cfg.verifier)
    model_path = str(team.agents[0].model_path)
    ours, generated, discussions = [], [], []
    try:
        run_discussion(team, problems[:2], 1, DiscussionConfig(), verifier, seed=-1)  # warm-up, untimed
        for seed in range(repeats):
            for engines in team.distinct_engines():  # cold, as after a weight push; the baselines start cold too
                engines.call_all("reset_prefix_cache")
            result = run_discussion(team, problems, turns, DiscussionConfig(), verifier, seed)
            generated.append(sum(len(r.token_ids) for r in result.records.values()))
            ours.append(generated[-1] / result.seconds["generate"])
            discussions.append(requests_of(result, seed))
            print(f"rollout {agents} x {model}: mapoco {ours[-1]:.1f} tok/s ({generated[-1]} tokens)", flush=True)
        engine_pid = team.agents[0].engines.call_all("pid")[0]
        memory = {f"engine {model}" + (f" ({agents} agents)" if agents > 2 else ""): peak_rss_mib(engine_pid)}
    finally:
        team.shutdown()
        verifier.shutdown()
    mapoco_s = time.perf_counter() - began
    # The baselines get the whole team's CPUs (Ray sets their thread counts from num_cpus): same hardware. Capped
    # at the machine's cores: 4 one-thread engines share 2 cores, but 4 threads of one process would stall each
    # other at every barrier, and the ceiling should be the best the hardware does.
    cpus = min(agent.engine.num_cpus * agents, os.cpu_count() or 1)
    raw_s, raw = timed(lambda: _replay(ray.remote(RawEngine).options(
        num_cpus=cpus,
        runtime_env={"env_vars": {**engine_env(agent.engine),
                                  "VLLM_CPU_KVCACHE_SPACE": str(agent.engine.kv_cache_gib * agents)}},
    ).remote(model_path, dtype, agent.engine.max_model_len), discussions, agent.sampling))
    hf_s, hf = timed(lambda: _replay(ray.remote(HFGenerate).options(num_cpus=cpus).remote(model_path, dtype, int(cpus)),
                                     discussions, agent.sampling))
    print(f"rollout {agents} x {model}: raw vLLM {raw}, HF generate {hf} tok/s; phases with start-up: "
          f"mapoco {mapoco_s:.0f}s, raw vLLM {raw_s:.0f}s, HF generate {hf_s:.0f}s", flush=True)
    sizes = {"model": model, "agents": agents, "turns": turns, "questions": questions,
             "max_new_tokens": max_new_tokens, "dtype": dtype, "generated_tokens": generated}
    ours_figure = Figure(f"mapoco discussion ({agents} engines)", "tok/s", ours)
    return (Result("rollout_vs_engine", ours_figure, Figure("raw vLLM, one batch", "tok/s", raw), sizes,
                   target=0.9, ratios=[a / b for a, b in zip(ours, raw)], extra={"peak_rss_mib": memory}),
            Result("rollout_vs_hf_generate", ours_figure, Figure("HF generate, agent by agent", "tok/s", hf),
                   sizes, target=2.0, ratios=[a / b for a, b in zip(ours, hf)]))
