"""The model zoo's catalogue: every tiny model's spec (architecture, tokenizer, warm-start recipe) and the folder
each known model lives in. ``mapoco.testbed`` builds them; ``mapoco.models.registry`` finds them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mapoco.tasks import TaskConfig

SMOLLM2 = "smollm2"
SMOLLM2_DIR = "smollm2-135m-instruct"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TURN_TAG_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    vocab_size: int
    special_tokens: tuple[str, ...]  # get ids 0.. in this order
    eos: str  # end of turn: generation stops here
    pad: str
    bos: str | None  # None: the template adds no begin token (Qwen style)
    chat_template: str
    seed: int  # seeds the corpus, so two specs with the same sizes still learn different merges


@dataclass(frozen=True)
class TinyModelSpec:
    name: str
    architecture: str  # "qwen2" | "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tokenizer: TokenizerSpec
    max_position_embeddings: int = 1024
    # Warm-start. Tiny models and small batches: on 2 CPU cores the number of optimizer steps, not the
    # model size, is what makes arithmetic learnable within a minute.
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 100
    max_steps: int = 2500
    easy_steps: int = 500  # first steps on one-digit operands only (a curriculum)
    discussion_fraction: float = 0.2  # share of examples that are multi-turn discussion threads
    target_accuracy: float = 0.5  # stop once greedy turn-1 validation accuracy reaches this
    eval_every: int = 50  # steps between validation checks (100 problems, ~0.3 s each)
    seed: int = 0
    # Fields added after the first models are left out of the repr and enter the fingerprint only when set
    # (``_tiny_fingerprint``), so the models built before them keep their fingerprint and cache.
    role: str = field(default="solver", repr=False)  # "solver" answers questions | "conductor" writes workflows
    task_params: tuple[tuple[str, Any], ...] = field(default=(), repr=False)  # the questions: over ARITHMETIC_DEFAULTS
    workflow_fraction: float = field(default=0.0, repr=False)  # solver: share of examples that are workflow steps
    two_step_fraction: float = field(default=0.0, repr=False)  # share of workflows with a second, all-seeing step
    pool_sizes: tuple[int, ...] = field(default=(), repr=False)  # conductor: worker-pool sizes, drawn uniformly
    # A discussion specialist (``_specialist_thread``): its discussion threads are pair discussions with a peer who
    # knows ``peer_operators``, on questions of either specialty, and end by keeping or adopting at random.
    peer_operators: tuple[str, ...] = field(default=(), repr=False)
    # Share of examples that are its step of a composition question ``a * b + c`` (``composition_step``): a ``*``
    # specialist's first step answers the product, a ``+`` specialist's second step adds c to the earlier answer.
    composition_fraction: float = field(default=0.0, repr=False)
    # A conductor for pools with worker cards (``conductor_message``'s "Model 0 (adds)"): each pool position gets a
    # card drawn from these, and the plan first names a card and asks a worker holding it.
    cards: tuple[str, ...] = field(default=(), repr=False)
    # A conductor for pools numbered by stable ids (``conductor.pool_ids=stable``): each pool is a random subset, in
    # random order, of this many workers, listed by their own ids ("Model 3, Model 1"); 0: pools of 0..k-1.
    stable_ids_of: int = field(default=0, repr=False)
    # A conductor: share of examples that go on to a re-plan round (``replan_message``), answered by accepting or by
    # a new plan at random, whatever the answer shown
    replan_fraction: float = field(default=0.0, repr=False)
    # A second domain (MAPoRL's unseen domain, the ``numbers`` task): (its own kind, the peer's kind). A
    # ``second_domain_fraction`` of the examples come from it: first-turn answers of its own kind and, a
    # ``discussion_fraction`` of them, pair discussions on either kind as ``_specialist_thread`` draws them.
    second_domain: tuple[str, str] = field(default=(), repr=False)
    second_domain_fraction: float = field(default=0.0, repr=False)
    # A model that starts from another built model (its weights and tokenizer) instead of from scratch: the warm-start
    # then teaches what the base does not know, on a mixture that keeps what it does.
    base_model: str = field(default="", repr=False)
    # The build fails when the warm-start's final validation score (``target_accuracy``'s measure) is below this:
    # RL would start from a model that cannot do what its experiment assumes (a conductor asking unlisted workers).
    gate: float = field(default=0.0, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def task(self) -> TaskConfig:
        return TaskConfig(params=dict(self.task_params))


TINY_MODELS: dict[str, TinyModelSpec] = {
    "tiny-qwen": TinyModelSpec(
        name="tiny-qwen",
        architecture="qwen2",
        hidden_size=64,
        num_layers=2,
        num_heads=2,  # head_dim 32: vLLM's CPU attention rejects 16
        num_kv_heads=1,
        intermediate_size=256,
        tokenizer=TokenizerSpec(
            vocab_size=384,
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            eos="<|im_end|>",
            pad="<|endoftext|>",
            bos=None,
            chat_template=CHATML_TEMPLATE,
            seed=1,
        ),
        seed=1,
    ),
    "tiny-llama": TinyModelSpec(
        name="tiny-llama",
        architecture="llama",
        hidden_size=128,
        num_layers=2,
        num_heads=2,  # head_dim 64
        num_kv_heads=2,
        intermediate_size=256,
        tokenizer=TokenizerSpec(
            vocab_size=320,  # fewer merges than tiny-qwen: some words stay split, ids differ throughout
            special_tokens=("<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
            eos="<|end|>",
            pad="<|pad|>",
            bos="<|begin|>",
            chat_template=TURN_TAG_TEMPLATE,
            seed=2,
        ),
        seed=2,
    ),
}
_QWEN = TINY_MODELS["tiny-qwen"]
_ONE_DIGIT = (("min_terms", 2), ("max_terms", 2), ("min_digits", 1), ("max_digits", 1))
# The Conductor demo: two specialists, each warm-started on one operator only, and a conductor that writes
# well-formed workflows but routes at random; RL has to learn who is good at what.
TINY_MODELS.update(
    {
        spec.name: spec
        for spec in (
            replace(
                _QWEN,
                name=f"tiny-{op_name}",
                tokenizer=replace(_QWEN.tokenizer, seed=seed),
                seed=seed,
                task_params=(*_ONE_DIGIT, ("operators", (op,))),
                discussion_fraction=0.0,
                workflow_fraction=0.5,  # the other half: first-turn questions
                two_step_fraction=0.25,
                target_accuracy=target,
            )
            for op_name, op, seed, target in (("add", "+", 3, 0.9), ("mul", "*", 4, 0.8))
        )
    },
)
# The collaboration testbed (README, "A team that learns to collaborate"): a heterogeneous pair of specialists (a
# Qwen2 + specialist, a Llama * specialist with another tokenizer) who know the discussion format but not when to
# defer: their warm-start threads keep their own answer or adopt the peer's at random, whoever is right.
_LLAMA = TINY_MODELS["tiny-llama"]
TINY_MODELS.update(
    {
        spec.name: spec
        for spec in (
            replace(
                base,
                name=name,
                tokenizer=replace(base.tokenizer, seed=seed),
                seed=seed,
                task_params=(*_ONE_DIGIT, ("operators", (op,))),
                peer_operators=(peer,),
                discussion_fraction=0.6,
                # Copying a peer's number takes longer to learn than the arithmetic: no early stop at a turn-1
                # target, every step is spent (measured: stopped at 0.9 turn-1 accuracy, 55% of later answers
                # were neither the own nor the peer's answer).
                max_steps=2500,
                eval_every=2500,
                target_accuracy=1.0,
            )
            for name, base, op, peer, seed in (("talk-add", _QWEN, "+", "*", 6), ("talk-mul", _LLAMA, "*", "+", 7))
        )
    },
)
# MAPoRL's unseen domain: the collaboration testbed's pair, each taught one more thing that is not arithmetic (the
# first / the last digit of a four-digit number) from its built weights, with the same keep-or-adopt-at-random
# discussions there. Co-training on the arithmetic alone (domain A) then shows whether when-to-defer carries over to
# the digits (domain B). 1,000 steps, 40% of them on the digits: the arithmetic and its discussions stay.
TINY_MODELS.update(
    {
        spec.name: spec
        for spec in (
            replace(
                TINY_MODELS[talk],
                name=name,
                base_model=talk,
                seed=seed,
                second_domain=kinds,
                second_domain_fraction=0.4,
                lr=1e-3,
                warmup_steps=50,
                easy_steps=0,
                max_steps=1000,
                eval_every=1000,
            )
            for name, talk, kinds, seed in (("duo-add", "talk-add", ("first_digit", "last_digit"), 14),
                                            ("duo-mul", "talk-mul", ("last_digit", "first_digit"), 15))
        )
    },
)
# The Conductor's composition experiment: each specialist does one part of `a * b + c` (and its own operator's
# two-term questions), so only a two-step workflow whose second step sees the first answers it.
TINY_MODELS.update(
    {
        spec.name: spec
        for spec in (
            replace(
                TINY_MODELS[f"tiny-{op_name}"],
                name=f"part-{op_name}",
                tokenizer=replace(_QWEN.tokenizer, seed=seed),
                seed=seed,
                workflow_fraction=0.3,
                composition_fraction=0.5,
                # No early stop: turn-1 accuracy is not what these are for; every step is spent.
                max_steps=steps,
                eval_every=steps,
                target_accuracy=1.0,
                **size,
            )
            # Adding c to a two-digit product, with c far back in the question: the specialists' size learnt it 27%
            # of the time in 2,500 steps, twice the width 15% in 4,000 (at lr 2e-3; it had not converged).
            for op_name, seed, steps, size in (
                ("add", 8, 8000, {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                                  "intermediate_size": 512, "lr": 1e-3}),
                ("mul", 9, 2500, {}))
        )
    },
)
# The Conductor's cost experiment: a generalist twice as wide as the specialists, right on both operators (the
# expensive worker of its pool; the cheap one is tiny-add).
TINY_MODELS["tiny-both"] = replace(
    TINY_MODELS["tiny-add"],
    name="tiny-both",
    hidden_size=128,
    num_heads=4,  # head_dim 32
    num_kv_heads=2,
    intermediate_size=512,
    tokenizer=replace(_QWEN.tokenizer, seed=10),
    seed=10,
    task_params=(*_ONE_DIGIT, ("operators", ("+", "*"))),
    target_accuracy=0.9,
)
TINY_MODELS["tiny-conductor"] = replace(
    _QWEN,
    name="tiny-conductor",
    tokenizer=replace(_QWEN.tokenizer, vocab_size=512, seed=5),  # long fixed prompt: more merges, shorter inputs
    seed=5,
    role="conductor",
    task_params=(*_ONE_DIGIT, ("operators", ("+", "*"))),
    two_step_fraction=0.25,
    pool_sizes=(1, 2, 2, 2, 3),  # mostly two workers
    # No early stop: the learning rate decays to zero over all the steps, so the sampled worker ids settle at
    # uniform (stopping at a high rate leaves a random bias towards one id). The validation score, checked once at
    # the end, is the share of replies sampled at temperature 1 that parse as a workflow.
    max_steps=1200,
    eval_every=1200,
    target_accuracy=1.0,
)
# The Conductor's recursion experiment: tiny-conductor's warm-start, and a third of its examples go on to a re-plan
# round (accept or re-plan, at random, whatever answer it was shown), so both are in reach of RL.
TINY_MODELS["replan-conductor"] = replace(
    TINY_MODELS["tiny-conductor"],
    name="replan-conductor",
    tokenizer=replace(TINY_MODELS["tiny-conductor"].tokenizer, seed=13),
    seed=13,
    replan_fraction=0.33,
)
# The Conductor's pools experiment: pools of 2-4 workers drawn at run time, each known by its card alone. Which card a
# question needs is left to RL (the card a warm-start plan names is random); finding a worker that holds it is not:
# the reasoning restates the prompt's card entries sorted ("Listed: adds=Model 1, multiplies=Model 0."), then names
# a card and a holder at random. With every entry one token (``chat_data.whole_tokens``) the worker asked holds the
# card named 1.00 of the time after 5,000 steps (0.87 after 3,000; chance 0.65). Without whole entries it was
# 0.48-0.70 in six formats and sizes, up to 4,000 steps: the holder a few tokens after its card is an induction these
# models did not learn.
TINY_MODELS["card-conductor"] = replace(
    TINY_MODELS["tiny-conductor"],
    name="card-conductor",
    tokenizer=replace(TINY_MODELS["tiny-conductor"].tokenizer, seed=11),
    seed=11,
    two_step_fraction=0.0,
    pool_sizes=(2, 3, 4),
    cards=("adds", "multiplies"),
    # No early stop (as tiny-conductor): the learning rate decays to zero, so no random bias towards one card or
    # worker is left; the score, checked at the end, is the lower of the parse rate and the card-held rate.
    max_steps=5000,
    eval_every=5000,
    target_accuracy=1.0,
    gate=0.9,
)
# The Conductor's pools the paper's way: pools of 2-4 of four workers, each listed by its stable id. The warm-start
# asks a listed id uniformly, whatever the question: which id does what is left to RL. Asking only a listed id is a
# look-up in the prompt, and two things make it learnable at tiny-conductor's size: each worker's name is one token
# of its own ("Model 3", so whether a worker is listed is which tokens the prompt holds, not a digit found among the
# question's), and a reasoning line restates the listed ids in increasing order ("Listed: Model 1, Model 3.": every
# id in it a supervised look-up). Without them plans asked the four ids uniformly whatever the prompt listed
# (sampled parse rate 0.74-0.78 after 1,200 or 2,400 steps, at this size and at card-conductor's: what ignoring
# the list gives); with the tokens alone 0.855 after 4,000; with both 0.995 after 3,000. The reasoning names its
# pick right after the operation's word (``chat_data.pick_line``), and the plan asks the worker named.
TINY_MODELS["pool-conductor"] = replace(
    TINY_MODELS["tiny-conductor"],
    name="pool-conductor",
    tokenizer=replace(TINY_MODELS["tiny-conductor"].tokenizer, seed=12),
    seed=12,
    two_step_fraction=0.0,
    pool_sizes=(2, 3, 4),
    stable_ids_of=4,
    max_steps=3000,  # no early stop, as card-conductor
    eval_every=3000,
    target_accuracy=1.0,
    gate=0.95,
)
MODEL_DIRS: dict[str, str] = {**{name: name for name in TINY_MODELS}, SMOLLM2: SMOLLM2_DIR}
