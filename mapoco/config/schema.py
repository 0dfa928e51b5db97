"""The run configuration's schema: every key, its type and its default (the one place defaults live,
each with a comment on what it means), and the name lists the validators check against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mapoco.tasks import TaskConfig

COMMANDS = ("eval", "train", "train-verifier", "serve")  # `mapoco <command>` sets it
LOGPROB_BREACH_ACTIONS = ("stop", "warn")
METHODS = ("discussion", "conductor")
VERIFIER_KINDS = ("rule", "learned")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks (a test compares the two)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies
# The names the validators accept; the code that implements each keeps its own registry, and a test checks that the
# two match (tests/config/test_config.py).
WEIGHT_SYNCS = ("auto", "object_store", "collective")  # mapoco.weights.sync.sync_method
TOPOLOGIES = ("all_to_all", "ring", "star")  # mapoco.rollout.topology: who sees whom in a discussion
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")  # mapoco.training.algorithms: advantage estimators
KL_ESTIMATORS = ("k1", "k2", "k3")  # mapoco.training.algorithms: KL penalty estimators
REPLAN_REWARDS = ("change", "discounted")  # mapoco.conductor.rollout: what a re-plan earns
POOL_IDS = ("stable", "renumbered")  # mapoco.conductor.rollout.ConductorRunner.ids: how a pool's workers are numbered
MANAGED_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE",
                         "VLLM_ENABLE_V1_MULTIPROCESSING"})  # the actors' environment mapoco sets (env may not)
GPU_MEMORY_CAP = 0.9  # of one GPU's memory, for everything mapoco puts on it (the rest: CUDA context, fragments)
WANDB_MODES = ("offline", "online", "disabled")
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # characters wandb refuses in a project name
MAX_SEED = 2**31 - 1  # engines seed numpy (< 2**32) with seed + 1000 x agent + replica
SEED_RANGE = f"an integer in 0..{MAX_SEED}"
INCENTIVE_MODES = ("paper", "reference_code", "none")


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"{key}={value!r}: {allowed}")
        self.key = key


@dataclass(frozen=True)
class RewardConfig:
    gamma: float = 0.3
    incentives: str = "paper"
    alpha0: float = 0.0  # resist a wrong majority (keep a right answer)
    alpha1: float = 0.0  # be persuaded by right peers (wrong -> right)
    beta0: float = 0.0  # a wrong answer after which wrong peers become right
    beta1: float = 0.0  # persuade wrong peers with a right answer


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    stop: list[str] | None = None  # strings that end a reply (left out of it)


@dataclass(frozen=True)
class EngineConfig:
    replicas: int = 1
    dtype: str = "auto"  # auto: bf16 on GPUs, float32 on every CPU (mapoco.runtime.precision)
    max_model_len: int = 1024
    kv_cache_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    gpu_memory_utilization: float = 0.4  # GPU: the share of each of its GPUs' memory a replica takes (weights + KV)
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] | None = None  # custom Ray resources per replica: pin it to the nodes with them
    env: dict[str, str] | None = None  # extra environment of each replica (e.g. VLLM_LOGGING_LEVEL: DEBUG)
    placement: str = "PACK"  # how the replicas spread over nodes (PLACEMENT_STRATEGIES)
    # The shared adapter engine only (team.lora_engine):
    max_loras: int = 0  # adapters in one batch; 0: one per agent on the engine
    max_lora_rank: int = 0  # 0: the smallest rank vLLM offers that holds every adapter on the engine


@dataclass(frozen=True)
class LearnerConfig:
    num_learners: int = 1  # DeepSpeed ranks in this agent's learner group
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    micro_batch_size: int = 16
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: int = 16
    dtype: str = "auto"  # auto: bf16 on GPUs, float32 on every CPU (mapoco.runtime.precision)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] | None = None  # custom Ray resources per rank: pin it to the nodes with them
    env: dict[str, str] | None = None  # extra environment of each rank (e.g. NCCL_DEBUG: INFO)
    placement: str = "PACK"  # how the ranks spread over nodes (PLACEMENT_STRATEGIES)
    colocate: bool = False  # rank k rides in engine replica k's bundle (its GPU, or CPUs); the engines sleep meanwhile


@dataclass(frozen=True)
class PriceConfig:
    """What one call of a Conductor worker costs (method=conductor), in any unit: a price per call plus one per
    generated token."""

    per_call: float = 0.0
    per_token: float = 0.0

    def of(self, tokens: int) -> float:
        return self.per_call + self.per_token * tokens


@dataclass(frozen=True)
class AgentConfig:
    name: str
    model: str
    trainable: bool = True  # false: a frozen partner (MAPoRL's single-agent-trained baseline)
    adapter: str | None = None  # a frozen agent on the shared LoRA engine: its fixed peft adapter (None: the base)
    price: PriceConfig = field(default_factory=PriceConfig)  # a Conductor worker's cost per call
    description: str = ""  # a Conductor worker's card, shown to the conductor with its number ("adds=Model 0")
    # A Conductor worker that fails this share of its calls with an error reply, drawn per call from its seed (a
    # testbed where re-planning can help)
    fail_rate: float = 0.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)


@dataclass(frozen=True)
class TeamConfig:
    name: str
    agents: list[AgentConfig]
    shared_policy: bool = False  # one policy (engines + learner) plays every seat; agents must share a model
    # One engine serves every agent on the LoRA-trained agents' base model, each with its own adapter; agents on
    # other models keep their own engines.
    lora_engine: bool = False

    def lora_seats(self) -> list[int]:
        """The seats the shared LoRA engine serves: every agent on the base model of the first agent that trains
        LoRA (validation makes every LoRA-trained agent use that model). Empty without ``lora_engine``."""
        trained = [a.model for a in self.agents if a.trainable and a.learner.lora_rank > 0]
        if not self.lora_engine or not trained:
            return []
        return [i for i, a in enumerate(self.agents) if a.model == trained[0]]

    def policy_seats(self) -> dict[int, list[int]]:
        """Trained policies: owner seat (whose engines and learner config it uses) -> the seats it plays. A
        checkpoint keeps a policy under ``agent_<first seat>``."""
        seats_of: dict[int, list[int]] = {}
        for index, agent in enumerate(self.agents):
            if agent.trainable:
                seats_of.setdefault(0 if self.shared_policy else index, []).append(index)
        return seats_of


@dataclass(frozen=True)
class AlgorithmConfig:
    estimator: str = "gae"  # gae (MAPoRL) | grpo | rloo | reinforce_pp
    samples_per_question: int = 2  # independent discussions per question (group baselines need >= 2)
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.01
    kl_estimator: str = "k1"  # k1 | k2 | k3
    kl_in_reward: bool = True  # false: KL is a loss term instead
    whiten_advantages: bool = True
    scale_by_std: bool = True  # grpo: divide by the group's std (false: Dr. GRPO, the mean only)
    ppo_epochs: int = 2
    mini_batches: int = 1  # optimizer steps per PPO epoch
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20
    batch_questions: int = 16  # training questions per step (each discussed samples_per_question times)
    eval_every: int = 10  # 0: no evaluation during training
    eval_limit: int = 100  # held-out questions per evaluation
    save_every: int = 10  # 0: no checkpoints
    keep_checkpoints: int = 2
    resume: str | None = None  # auto: the last complete checkpoint of output_dir; or a checkpoint directory
    # A new training phase from a trained run's weights (its run directory: the latest complete checkpoint, or a
    # step_N folder): this run's own steps, data order, optimizer and learning-rate schedule. resume wins over it.
    init_from: str | None = None
    logprob_tolerance: float | None = None  # max |engine - learner| logprob that counts as in sync (None: by dtype)
    logprob_breach_steps: int = 3  # this many steps in a row above the tolerance ...
    on_logprob_breach: str = "stop"  # ... stop the run | warn (the progress line says so every step)
    weight_sync: str = "auto"  # WEIGHT_SYNCS: auto (collective where each member owns its GPUs, else object_store)
    sync_timeout_s: float = 120.0  # a collective push (broadcast + reload) that takes longer names what stalled
    concurrent_policies: bool = True  # every policy scores, updates and syncs at once (false: one after another)
    off_policy_steps: int = 0  # 1: the next step's rollout runs during this step's update (weights one update old)
    is_weight_cap: float = 2.0  # off-policy: truncated importance weights pi_learner / pi_engine are at most this
    # Held-out domains, name -> task: evaluated beside `task` whenever it is (before and after training, every
    # eval_every steps), never trained on; `eval_limit` questions each (e.g. MAPoRL's unseen domain).
    eval_tasks: dict[str, TaskConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class DiscussionConfig:
    topology: str = "all_to_all"
    show_scores: bool = False  # MAPoRL reward_feedback: peers' verifier scores appear in the prompt
    batch_size: int = 256  # questions per rollout batch


@dataclass(frozen=True)
class HttpWorkerConfig:
    """A conductor worker behind an OpenAI-compatible chat-completions endpoint (closed or remote models)."""

    name: str
    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str
    api_key_env: str | None = None  # environment variable holding the key (never the key itself)
    timeout_s: float = 60.0
    max_tokens: int = 256
    temperature: float = 0.0
    concurrency: int = 16  # requests in flight at once to this endpoint
    price: PriceConfig = field(default_factory=PriceConfig)
    description: str = ""  # its card, shown to the conductor with its number


@dataclass(frozen=True)
class WorkflowConfig:
    """A hand-written workflow in the conductor's three lists (``mapoco.conductor.workflow``): an evaluation
    baseline that runs on the whole pool, numbered as the conductor sees it."""

    model_id: list[int] = field(default_factory=list)
    subtasks: list[str] = field(default_factory=list)
    access_list: list[list[Any]] = field(default_factory=list)  # per step: ["all"], [] or earlier indices [0, 2]


@dataclass(frozen=True)
class ConductorConfig:
    """``method=conductor``: team.agents[0] is the conductor (trained), team.agents[1:] its local workers."""

    http_workers: list[HttpWorkerConfig] = field(default_factory=list)
    max_steps: int = 5
    random_pools: bool = False  # each question draws a random subset of the pool (renumbered)
    min_pool: int = 1  # smallest random pool
    # How the prompt numbers a pool's workers: stable (a worker keeps its team index, "Model 3, Model 1", in every
    # pool; the paper's way) or renumbered (Model 0..k-1 in the order drawn, known only by cards)
    pool_ids: str = "stable"
    # Worker-name pools that random training pools never contain all of (a held-out pool composition)
    heldout_pools: list[list[str]] = field(default_factory=list)
    # eval: each of these pools too (worker names, in the order the conductor sees them), against its baselines
    eval_pools: list[list[str]] = field(default_factory=list)
    self_worker: bool = False  # the conductor is also a worker (recursion), up to max_depth
    max_depth: int = 1
    # Planning rounds per question: after each, the conductor sees its workflow's answer and accepts it (three empty
    # lists) or writes a new workflow, until it accepts or the budget is spent (1: no re-planning)
    max_rounds: int = 1
    # What a re-plan earns in training: "change" (the final outcome minus what accepting would have earned, in its
    # own group) or "discounted" (the paper's code: one group over all rounds, an earlier turn earning 0.75 of its
    # own outcome and 0.25 of the final one)
    replan_reward: str = "change"
    examples: list[str] = field(default_factory=list)  # few-shot examples shown in the prompt
    baselines: bool = True  # eval: also each worker alone, majority vote, a random workflow
    fixed_workflows: list[WorkflowConfig] = field(default_factory=list)  # eval: hand-written workflows too
    # reward = correctness - cost_weight * (the workflow's cost / cost_scale); a malformed plan still earns 0
    cost_weight: float = 0.0
    cost_scale: float = 0.0  # the cost that counts as 1 (0: one call of the priciest worker at its token limit)


@dataclass(frozen=True)
class VerifierConfig:
    kind: str = "rule"
    path: str | None = None  # learned verifier checkpoint (written by `mapoco train-verifier`)
    timeout_s: float = 30.0  # per sample
    workers: int = 2  # gold-check processes; a hung check costs one of them until the pool is rebuilt
    batch_size: int = 64
    num_cpus: float = 0.5
    # `mapoco train-verifier` only:
    base: str | None = None  # backbone model (None: the first agent's model)
    epochs: int = 3
    lr: float = 3e-4
    train_batch_size: int = 8
    held_out: float = 0.2  # share of questions kept out of training for the report


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = None  # None: join $RAY_ADDRESS if set, else start a local Ray instance
    num_cpus: int | None = None  # logical CPUs of a local instance (None: what the actors ask for)
    dashboard_host: str = "127.0.0.1"
    placement_timeout_s: float = 120.0  # a group (or a restarted actor's bundle) not placed by then is an error
    gpu_memory_gib: float | None = None  # mapoco plan: each GPU's memory, where the nodes cannot say (no nvidia-smi)


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "offline"
    project: str = "mapoco"
    group: str | None = None  # a multirun defaults it to the sweep directory's name
    name: str | None = None  # default: the run directory's name (a multirun job: its overrides)


@dataclass(frozen=True)
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # false: engine, learner and verifier output goes to <output_dir>/logs/, the terminal shows progress and tables;
    # true: it streams to the terminal as well (Ray's log forwarding)
    show_logs: bool = False


@dataclass(frozen=True)
class ServeConfig:
    """``mapoco serve checkpoint=DIR``: a trained team (or conductor) behind an OpenAI-compatible endpoint."""

    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: set api_key_env then
    port: int = 8000
    route_prefix: str = "/"  # endpoints: <route_prefix>/v1/chat/completions and <route_prefix>/v1/models
    model_name: str | None = None  # the "model" clients send (None: the run directory's name)
    replicas: int = 1  # Serve replicas, each with engines of its own (the team's engine.* settings)
    num_cpus: float = 0.0  # per Serve replica (it tokenizes and routes; its engines reserve their own bundles)
    max_batch_size: int = 32  # questions in discussion at once (each step: their next turns, one engine batch)
    batch_wait_timeout_s: float = 0.05  # how long an idle replica's first question waits for others to join
    api_key_env: str | None = None  # environment variable holding the bearer token clients must send (None: no auth)
    max_input_chars: int = 4000  # longer questions are refused with 400


@dataclass(frozen=True)
class RunConfig:
    task: TaskConfig
    team: TeamConfig
    command: str = "eval"
    method: str = "discussion"  # discussion (MAPoRL co-training) | conductor
    seed: int = 0
    turns: int = 3
    output_dir: str = "outputs/run"
    checkpoint: str | None = None  # mapoco serve: a run directory (its latest complete checkpoint) or a step_N folder
    discussion: DiscussionConfig = field(default_factory=DiscussionConfig)
    conductor: ConductorConfig = field(default_factory=ConductorConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
