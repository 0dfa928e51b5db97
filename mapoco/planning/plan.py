"""`mapoco plan`: where a run's actors would land and what each GPU would hold, before anything starts.

The placement is the cluster's own answer, not a simulation: every placement group the run reserves is reserved the
same way, in the same order, and a probe actor in each bundle reports its node and GPU ids; then all of it is
released. Memory per GPU adds what each part holds there:

- an engine replica takes ``engine.gpu_memory_utilization`` of each of its GPUs (vLLM's own rule); inside it the
  weights (parameters x dtype / tensor parallel) and the KV cache in the rest, in tokens by vLLM's own page size
  (``FullAttentionSpec``), which must hold at least ``engine.max_model_len`` tokens (vLLM refuses to start otherwise);
  vLLM's activation peak and CUDA graphs come out of that rest too, measured at start-up, so the tokens are a ceiling;
- a learner rank holds its model states as DeepSpeed's own estimators count them for its ZeRO stage and number of
  ranks (``estimate_zero2/3_model_states_mem_needs``, no offload), over the trained parameters (the LoRA adapters
  only, with LoRA), plus the frozen weights beside them (the reference policy, or LoRA's base); activations are not
  estimated (they grow with ``learner.micro_batch_size`` and the sequence length), so the figure is a floor.

A GPU fits when its parts add up to at most ``GPU_MEMORY_CAP`` of its memory (the rest: CUDA context, fragments).
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from mapoco.config import GPU_MEMORY_CAP, AgentConfig, ConfigError, RunConfig
from mapoco.runtime.cluster import engine_hosts, learning_agents, run_bundles
from mapoco.runtime.placement import Bundles, node_of_actor, reserve
from mapoco.runtime.precision import (
    pick_dtype,  # auto on a GPU: bf16 (fp16, the same bytes, before Ampere)
)

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Seat:
    """One actor of the run, where the cluster placed its bundle."""

    group: str  # the config key that sizes its group, e.g. team.agents[0].engine
    index: int  # replica or rank
    node_ip: str
    node_id: str
    gpu_ids: tuple[str, ...]
    gpu_gib: float | None  # its GPUs' memory as the node reports it (None: no GPU, or none the node can read)


@dataclass(frozen=True)
class Load:
    """What one part holds on one GPU."""

    who: str
    gib: float
    detail: str


@dataclass
class GpuPlan:
    node_ip: str
    gpu_id: str
    total_gib: float | None
    loads: list[Load] = field(default_factory=list)

    @property
    def used_gib(self) -> float:
        return sum(load.gib for load in self.loads)

    @property
    def fits(self) -> bool | None:
        return None if self.total_gib is None else self.used_gib <= GPU_MEMORY_CAP * self.total_gib + 1e-9


@dataclass
class Plan:
    seats: dict[str, list[Seat]]
    syncs: dict[str, str]  # team.agents[i] -> its weight-sync path
    gpus: list[GpuPlan]
    problems: list[str]  # what would stop the run (an engine without room for one sequence, a GPU over its cap)
    notes: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"fits": self.fits, "seats": {k: [asdict(s) for s in v] for k, v in self.seats.items()},
                "syncs": self.syncs, "problems": self.problems, "notes": self.notes,
                "gpus": [{**asdict(g), "used_gib": round(g.used_gib, 2), "fits": g.fits} for g in self.gpus]}


# ---------------------------------------------------------------- placement, as the cluster decides it
@ray.remote(num_cpus=0)
def _where(bundle: int) -> dict[str, Any]:
    """Run inside a bundle (a task: Ray reuses its worker processes, where actors would each start one)."""
    return {**node_of_actor(bundle), "gpu_gib": _gpu_gib(ray.get_gpu_ids())}


def _gpu_gib(gpu_ids: list) -> float | None:
    """The first assigned GPU's memory from nvidia-smi (no CUDA import); None where there is none to ask."""
    if not gpu_ids:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i",
                              str(gpu_ids[0])], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return float(out.stdout.split()[0]) / 1024 if out.returncode == 0 and out.stdout.strip() else None


def place(groups: dict[str, Bundles], timeout_s: float) -> dict[str, list[Seat]]:
    """Reserve every group as the run would, in its order, ask each bundle where it is, and release it all."""
    reserved, probes = [], []
    try:
        for what, group in groups.items():
            placement = reserve(group, what, timeout_s)
            reserved.append(placement)
            probes += [(what, i, _where.options(num_gpus=bundle.get("GPU", 0),
                                                scheduling_strategy=placement.strategy(i)).remote(i))
                       for i, bundle in enumerate(group.bundles)]
        found = ray.get([probe for *_, probe in probes], timeout=timeout_s)
    finally:
        for placement in reserved:
            placement.remove()
    seats: dict[str, list[Seat]] = defaultdict(list)
    for (what, i, _), info in zip(probes, found, strict=True):
        seats[what].append(Seat(what, i, info["node_ip"], info["node_id"], tuple(info["gpu_ids"]), info["gpu_gib"]))
    return dict(seats)


# ---------------------------------------------------------------- memory, from vLLM's and DeepSpeed's own counts
BLOCK_SIZE = 16  # vLLM's default KV-cache block, in tokens


def kv_cache_tokens(model: str, dtype: str, tensor_parallel: int, gib: float) -> int:
    """The tokens a KV cache of ``gib`` per GPU holds, as vLLM counts them: whole blocks of every layer's keys and
    values, each GPU holding its share of the KV heads."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from mapoco.planning.architecture import model_shape

    shape = model_shape(model)
    page = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=max(shape.kv_heads // tensor_parallel, 1),
                             head_size=shape.head_dim, dtype=getattr(torch, dtype)).page_size_bytes
    return int(max(gib, 0) * GIB // (page * shape.layers)) * BLOCK_SIZE


def engine_memory(agent: AgentConfig, gpu_gib: float) -> tuple[float, float, int]:
    """One GPU of an engine replica: what vLLM takes of it, the weights' part (GiB) and the KV cache's tokens at
    most (what is left after the weights; vLLM's activation peak and CUDA graphs come out of it too)."""
    from mapoco.planning.architecture import model_shape

    engine = agent.engine
    tp, dtype = engine.tensor_parallel_size, pick_dtype(engine.dtype, on_gpu=True)
    share = engine.gpu_memory_utilization * gpu_gib
    weights = model_shape(agent.model).params * DTYPE_BYTES[dtype] / tp / GIB
    return share, weights, kv_cache_tokens(agent.model, dtype, tp, share - weights)


def engine_load(agent: AgentConfig, gpu_gib: float, who: str) -> tuple[Load, str | None]:
    """One GPU of an engine replica: its reservation, and why vLLM would refuse it (None: it starts)."""
    engine = agent.engine
    tp, dtype = engine.tensor_parallel_size, pick_dtype(engine.dtype, on_gpu=True)
    share, weights, tokens = engine_memory(agent, gpu_gib)
    detail = (f"{engine.gpu_memory_utilization:g} x {gpu_gib:g} GiB: weights {weights:.1f} GiB ({dtype}"
              f"{f', 1/{tp} each' if tp > 1 else ''}), KV cache <= {share - weights:.1f} GiB = {tokens:,} tokens")
    problem = None
    if tokens < engine.max_model_len:
        problem = (f"{who}: {detail}, fewer than engine.max_model_len={engine.max_model_len}; raise "
                   f"engine.gpu_memory_utilization or engine.tensor_parallel_size")
    return Load(who, share, detail), problem


def learner_load(agent: AgentConfig, ranks: int, who: str) -> Load:
    """One learner rank's model states (DeepSpeed's estimators) and the frozen weights it holds beside them."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
    )

    from mapoco.planning.architecture import model_shape

    learner = agent.learner
    shape = model_shape(agent.model, learner if learner.lora_rank else None)
    trained = shape.lora_params or shape.params
    if learner.zero_stage == 3:
        states = estimate_zero3_model_states_mem_needs(trained, min(shape.largest_layer, trained), ranks, 1,
                                                       cpu_offload=False, cpu_offload_params=False)[1]
    else:  # stages 0 and 1 keep more than ZeRO-2 partitions: counted as one rank holding all of it
        states = estimate_zero2_model_states_mem_needs(trained, ranks if learner.zero_stage == 2 else 1, 1,
                                                       cpu_offload=False)[1]
    frozen = shape.params * DTYPE_BYTES[pick_dtype(learner.dtype, on_gpu=True)]  # the reference policy, or LoRA's base
    what = "LoRA base" if learner.lora_rank else "reference"
    detail = (f"ZeRO-{learner.zero_stage} x {ranks} rank{'s' * (ranks > 1)}: states of {trained / 1e6:.1f}M trained "
              f"parameters {states / GIB:.1f} GiB + {what} {frozen / GIB:.1f} GiB, activations not counted")
    return Load(who, (states + frozen) / GIB, detail)


def gpu_loads(cfg: RunConfig, seats: dict[str, list[Seat]]) -> tuple[list[GpuPlan], list[str]]:
    """Every GPU the run uses, with what each of its parts holds there."""
    gpus: dict[tuple[str, str], GpuPlan] = {}
    problems: list[str] = []

    def gpu(seat: Seat, gpu_id: str) -> GpuPlan:
        total = seat.gpu_gib or cfg.cluster.gpu_memory_gib
        return gpus.setdefault((seat.node_id, gpu_id), GpuPlan(seat.node_ip, gpu_id, total))

    for i, agent in engine_hosts(cfg):
        for seat in seats[f"team.agents[{i}].engine"]:
            for gpu_id in seat.gpu_ids:
                plan = gpu(seat, gpu_id)
                if plan.total_gib is None:
                    continue
                load, problem = engine_load(agent, plan.total_gib, f"team.agents[{i}].engine replica {seat.index}")
                plan.loads.append(load)
                problems += [problem] if problem else []
    for i, agent in learning_agents(cfg):
        if agent.learner.num_gpus == 0:
            continue
        group = f"team.agents[{i}].learner"
        ranks = seats.get(group) or seats[f"team.agents[{i}].engine"]  # colocated: rank k in replica k's bundle
        for seat in ranks:
            plan = gpu(seat, seat.gpu_ids[0])
            plan.loads.append(learner_load(agent, len(ranks), f"{group} rank {seat.index}"))
    for plan in gpus.values():
        if plan.fits is False:
            problems.append(f"GPU {plan.gpu_id} of {plan.node_ip}: {plan.used_gib:.1f} GiB of {plan.total_gib:g} "
                            f"(at most {GPU_MEMORY_CAP} x its memory): " + "; ".join(l.who for l in plan.loads))
    return sorted(gpus.values(), key=lambda g: (g.node_ip, g.gpu_id)), problems


def sync_paths(cfg: RunConfig) -> dict[str, str]:
    """How each trained agent's weights reach its engines (``mapoco.weights``)."""
    from mapoco.weights.sync import sync_method

    paths = {}
    for i, agent in learning_agents(cfg):
        if i in cfg.team.lora_seats():
            paths[f"team.agents[{i}]"] = "adapter through the object store (shared LoRA engine)"
            continue
        method = sync_method(cfg.train.weight_sync, agent.learner, agent.engine)
        paths[f"team.agents[{i}]"] = ("collective: one broadcast group, NCCL" if agent.engine.num_gpus else
                                      "collective: one broadcast group, gloo") if method == "collective" else (
            "object store")
    return paths


def _driver_notes(cfg: RunConfig) -> list[str]:
    """What this driver's install and model cache say about the run: notes, not errors, for the plan is often made
    from a machine other than the cluster's nodes."""
    from mapoco.models.registry import resolve_model
    from mapoco.runtime.cluster import run_devices
    from mapoco.runtime.devices import check_install, this_install

    notes = []
    try:
        check_install(run_devices(cfg), this_install())
    except ConfigError as exc:
        notes.append(f"this machine's install would refuse the run here ({exc}); the cluster's nodes need their own")
    missing = sorted({a.model for a in cfg.team.agents if resolve_model(a.model, download=False) is None})
    if missing:
        notes.append(f"not downloaded here yet (the run fetches them when it starts): {', '.join(missing)}")
    return notes


def make_plan(cfg: RunConfig) -> Plan:
    """The run's plan on the connected cluster (``check_cluster`` has passed)."""
    seats = place(run_bundles(cfg), cfg.cluster.placement_timeout_s)
    uses_gpus = any(s.gpu_ids for group in seats.values() for s in group)
    notes = _driver_notes(cfg)
    if uses_gpus and not any(s.gpu_gib for group in seats.values() for s in group) and \
            cfg.cluster.gpu_memory_gib is None:
        raise ConfigError("cluster.gpu_memory_gib", None, "the nodes report no GPU memory (no nvidia-smi on them): "
                                                           "give each GPU's memory in GiB, e.g. 80 for an H100")
    if uses_gpus and not any(s.gpu_gib for group in seats.values() for s in group):
        notes.append(f"GPU memory: {cfg.cluster.gpu_memory_gib:g} GiB each (cluster.gpu_memory_gib; the nodes report "
                     "none)")
    gpus, problems = gpu_loads(cfg, seats)
    return Plan(seats, sync_paths(cfg), gpus, problems, notes)


def render(plan: Plan) -> str:
    """The plan as the terminal shows it."""
    lines = ["placement (reserved on this cluster, then released):"]
    for group, seats in plan.seats.items():
        for seat in seats:
            gpus = f"GPU {','.join(seat.gpu_ids)}" if seat.gpu_ids else "CPU only"
            lines.append(f"  {group}[{seat.index}]: node {seat.node_ip} ({seat.node_id[:8]}) {gpus}")
    lines.append("weight sync:")
    lines += [f"  {agent}: {path}" for agent, path in plan.syncs.items()]
    if plan.gpus:
        lines.append(f"memory per GPU (fits: at most {GPU_MEMORY_CAP} of it):")
    for gpu in plan.gpus:
        verdict = {True: "fits", False: "DOES NOT FIT", None: "memory unknown"}[gpu.fits]
        total = f" of {gpu.total_gib:g}" if gpu.total_gib else ""
        lines.append(f"  node {gpu.node_ip} GPU {gpu.gpu_id}: {gpu.used_gib:.1f}{total} GiB, {verdict}")
        lines += [f"    {load.who}: {load.gib:.1f} GiB ({load.detail})" for load in gpu.loads]
    lines += [f"note: {note}" for note in plan.notes]
    lines += [f"problem: {problem}" for problem in plan.problems]
    lines.append("plan: fits" if plan.fits else f"plan: does not fit ({len(plan.problems)} problems)")
    return "\n".join(lines)


def plan_command(cfg: RunConfig, as_json: bool = False) -> bool:
    """Connect (or start Ray as the run would), check the cluster holds the run, print its plan; whether it fits."""
    from mapoco.runtime.cluster import connect

    connect(cfg)
    plan = make_plan(cfg)
    print(json.dumps(plan.to_json(), indent=1) if as_json else render(plan), flush=True)
    return plan.fits
