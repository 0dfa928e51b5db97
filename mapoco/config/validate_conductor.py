"""Checks of method=conductor: the worker pool, prices, cards, named pools and hand-written workflows."""

from __future__ import annotations

import itertools
import math
import os
import re

from mapoco.config.checks import is_int, require, require_env_name, require_name
from mapoco.config.schema import POOL_IDS, REPLAN_REWARDS, RunConfig, WorkflowConfig


def validate_conductor(cfg: RunConfig) -> None:
    _validate_prices(cfg)
    _validate_cards(cfg)
    for i, agent in enumerate(cfg.team.agents):
        require(0 <= agent.fail_rate <= 1, f"team.agents[{i}].fail_rate", agent.fail_rate,
                "a share of calls in 0..1 (a Conductor worker's seeded failures)")
    if cfg.method != "conductor":
        return
    con = cfg.conductor
    pool = len(cfg.team.agents) - 1 + len(con.http_workers) + int(con.self_worker)
    require(pool >= 1, "team.agents", [a.name for a in cfg.team.agents],
            "the conductor needs workers: team.agents[1:] (local) or conductor.http_workers")
    require(not cfg.team.shared_policy, "team.shared_policy", True, "must be false for method=conductor")
    require(1 <= con.max_steps <= 5, "conductor.max_steps", con.max_steps, "an integer in 1..5")
    require(1 <= con.min_pool <= pool, "conductor.min_pool", con.min_pool, f"an integer in 1..{pool} (the pool)")
    require(con.pool_ids in POOL_IDS, "conductor.pool_ids", con.pool_ids, f"one of {', '.join(POOL_IDS)}")
    require(is_int(con.max_rounds) and con.max_rounds >= 1, "conductor.max_rounds", con.max_rounds,
            "an integer >= 1 (1: no re-planning)")
    require(con.replan_reward in REPLAN_REWARDS, "conductor.replan_reward", con.replan_reward,
            f"one of {', '.join(REPLAN_REWARDS)}")
    require(con.max_depth >= 1, "conductor.max_depth", con.max_depth, "an integer >= 1")
    for i, example in enumerate(con.examples):
        require_name(f"conductor.examples[{i}]", example, "a non-empty example workflow")
    require(math.isfinite(con.cost_weight) and con.cost_weight >= 0, "conductor.cost_weight", con.cost_weight,
            "a number >= 0 (0: cost does not enter the reward)")
    require(math.isfinite(con.cost_scale) and con.cost_scale >= 0, "conductor.cost_scale", con.cost_scale,
            "a cost > 0, or 0 for one call of the priciest worker at its token limit")
    workers = [a.price for a in cfg.team.agents[1:]] + [h.price for h in con.http_workers]
    require(con.cost_weight == 0 or con.cost_scale > 0 or any(p.of(1) > 0 for p in workers),
            "conductor.cost_weight", con.cost_weight,
            "0 while every worker is free: give workers a price (team.agents.N.price.per_call or per_token)")
    for i, flow in enumerate(con.fixed_workflows):
        _validate_fixed_workflow(f"conductor.fixed_workflows[{i}]", flow, pool - int(con.self_worker))
    _validate_named_pools(cfg)
    for i, worker in enumerate(cfg.team.agents[1:], start=1):
        require(not worker.trainable, f"team.agents[{i}].trainable", True,
                "workers are frozen in method=conductor: set trainable: false")
    for i, http in enumerate(con.http_workers):
        key = f"conductor.http_workers[{i}]"
        require(http.base_url.startswith(("http://", "https://")), f"{key}.base_url", http.base_url,
                "an http(s) URL ending before /chat/completions, e.g. http://127.0.0.1:8000/v1")
        require_name(f"{key}.model", http.model, "the endpoint's non-empty model name")
        require(http.timeout_s > 0, f"{key}.timeout_s", http.timeout_s, "must be > 0")
        require(http.max_tokens >= 1, f"{key}.max_tokens", http.max_tokens, "must be >= 1")
        require(http.temperature >= 0, f"{key}.temperature", http.temperature, "must be >= 0")
        require(http.concurrency >= 1, f"{key}.concurrency", http.concurrency, "must be >= 1")
        require_env_name(f"{key}.api_key_env", http.api_key_env)
        require(http.api_key_env is None or http.api_key_env in os.environ, f"{key}.api_key_env",
                http.api_key_env, "names an environment variable that is not set: export it first")


def _validate_prices(cfg: RunConfig) -> None:
    priced = [(f"team.agents[{i}].price", a.price) for i, a in enumerate(cfg.team.agents)]
    priced += [(f"conductor.http_workers[{i}].price", h.price) for i, h in enumerate(cfg.conductor.http_workers)]
    for key, price in priced:
        for name in ("per_call", "per_token"):
            value = getattr(price, name)
            require(math.isfinite(value) and value >= 0, f"{key}.{name}", value, "a price >= 0")


def _validate_cards(cfg: RunConfig) -> None:
    """A worker's card sits in the conductor's "Cards: multiplies=Model 1; adds=Model 0" line: one line without the
    separators , ; ="""
    cards = [(f"team.agents[{i}].description", a.description) for i, a in enumerate(cfg.team.agents)]
    cards += [(f"conductor.http_workers[{i}].description", h.description)
              for i, h in enumerate(cfg.conductor.http_workers)]
    for key, card in cards:
        require(not re.search(r"[\n,;=]", card) and card == card.strip(), key, card,
                "a one-line card without , ; or = (e.g. adds), or empty")


def _validate_named_pools(cfg: RunConfig) -> None:
    """conductor.heldout_pools and eval_pools name known workers, once each; random pools can avoid the held-out
    ones; every eval pool is large enough for the hand-written workflows."""
    con = cfg.conductor
    names = [a.name for a in cfg.team.agents[1:]] + [h.name for h in con.http_workers]
    names += [cfg.team.agents[0].name] if con.self_worker else []
    for kind, pools in (("heldout_pools", con.heldout_pools), ("eval_pools", con.eval_pools)):
        for i, pool in enumerate(pools):
            key = f"conductor.{kind}[{i}]"
            require(len(pool) >= 1 and len(set(pool)) == len(pool), key, pool,
                    "a non-empty list of worker names, each once")
            for j, name in enumerate(pool):
                require(name in names, f"{key}[{j}]", name, f"a worker's name, one of {names}")
    if con.heldout_pools:
        require(con.random_pools, "conductor.heldout_pools", con.heldout_pools,
                "only with conductor.random_pools=true (a fixed pool holds every worker)")
        held = [set(pool) for pool in con.heldout_pools]
        require(any(not any(h <= set(c) for h in held) for c in itertools.combinations(names, con.min_pool)),
                "conductor.heldout_pools", con.heldout_pools,
                f"pools of conductor.min_pool={con.min_pool} workers that hold none of them whole: hold out fewer "
                "pools or lower min_pool")
    needed = max((max(flow.model_id) + 1 for flow in con.fixed_workflows if flow.model_id), default=1)
    for i, pool in enumerate(con.eval_pools):
        require(len(pool) >= needed, f"conductor.eval_pools[{i}]", pool,
                f"at least {needed} workers: conductor.fixed_workflows run on every eval pool")


def _validate_fixed_workflow(key: str, flow: WorkflowConfig, pool: int) -> None:
    steps = len(flow.model_id)
    require(steps >= 1, f"{key}.model_id", flow.model_id, "a non-empty list: the worker of each step")
    for name, entries in (("subtasks", flow.subtasks), ("access_list", flow.access_list)):
        require(len(entries) == steps, f"{key}.{name}", entries, f"one entry per step ({steps}, as model_id)")
    for j, worker in enumerate(flow.model_id):
        require(is_int(worker) and 0 <= worker < pool, f"{key}.model_id[{j}]", worker,
                f"a worker id in 0..{pool - 1} (the pool, numbered as the conductor sees it)")
    for j, subtask in enumerate(flow.subtasks):
        require(isinstance(subtask, str), f"{key}.subtasks[{j}]", subtask, "the step's request, a string")
    for j, access in enumerate(flow.access_list):
        require(list(access) == ["all"] or all(is_int(i) and 0 <= i < j for i in access), f"{key}.access_list[{j}]",
                access, '["all"] (sees every earlier step), [] (sees none) or the earlier steps it sees ([0, 2])')
