"""A tiny model from nothing: its tokenizer trained on the task's text, its config, and the short supervised
warm-start on the chat data, so RL starts from a model that is sometimes right."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mapoco.models.specs import (
    TinyModelSpec,
    TokenizerSpec,
)
from mapoco.tasks import Problem, arithmetic_problems
from mapoco.testbed.chat_data import example_chat, one_digit_operands
from mapoco.testbed.probes import plan_stats, sample_plans, turn1_accuracy

NUM_VALIDATION = 100


def train_tokenizer(spec: TokenizerSpec, corpus: list[str], names: Sequence[str] = ()) -> Any:
    """A byte-level BPE with one token per digit (arithmetic is learnable digit by digit), wrapped as a
    ``PreTrainedTokenizerFast`` with its chat template and special tokens. ``vocab_size`` is an upper bound:
    training stops early once every corpus word is a single token. ``names`` become whole tokens of their own."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, whatever the text
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(name, normalized=False) for name in names])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        additional_special_tokens=[t for t in spec.special_tokens if t not in {spec.bos, spec.eos, spec.pad}],
        chat_template=spec.chat_template,
        model_max_length=1024,
    )


def tokenizer_corpus(spec: TinyModelSpec, problems: list[Problem]) -> list[str]:
    """Message texts, plus the role names so the template's headers are whole tokens."""
    rng = random.Random(spec.tokenizer.seed)
    chats = [example_chat(rng.choice(problems), spec, rng, problems) for _ in range(4000)]
    return [m["content"] for chat in chats for m in chat] + ["system\nuser\nassistant\n"] * 100


def tiny_model_config(spec: TinyModelSpec, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    # Qwen has no begin token; like Qwen's own config, its bos id is the end-of-text token.
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.architecture == "qwen2":
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    if spec.architecture == "llama":
        return LlamaConfig(**common, head_dim=spec.head_dim, architectures=["LlamaForCausalLM"])
    raise ValueError(f"unknown architecture {spec.architecture!r}")


Example = tuple[list[int], list[int]]  # input ids, labels (-100: no loss)


class _ChatEncoder:
    """Chats -> training examples. Prompts are tokenized from the rendered chat template; the final answer is
    tokenized on its own and appended with eos, exactly as an engine generates it after the prompt.

    Labels cover the final answer and every earlier assistant turn that repeats it (a right first answer inside
    a thread is one more first-turn example for free), unless that turn is marked ``"train": False`` (a
    specialist's earlier wrong answer); other earlier turns are context only."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}  # first-turn prompts repeat

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if text not in self.cache:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            self.cache[text] = (enc["input_ids"], enc["offset_mapping"])
        return self.cache[text]

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, chat: list[dict[str, str]]) -> Example:
        prompt, offsets = self._tokenize(self._render(chat[:-1]))
        target = self._tokenize(chat[-1]["content"])[0] + [self.tokenizer.eos_token_id]
        labels = [-100] * len(prompt) + target
        starts = {begin: i for i, (begin, _) in enumerate(offsets)}
        for turn, message in enumerate(chat[:-1]):
            if message["role"] != "assistant" or message["content"] != chat[-1]["content"] or not message.get(
                    "train", True):
                continue
            i = starts.get(len(self._render(chat[:turn])))
            if i is not None and prompt[i : i + len(target)] == target:  # the same tokens as if generated
                labels[i : i + len(target)] = target
        return prompt + target, labels


def _examples(tokenizer: Any, spec: TinyModelSpec, problems: list[Problem]) -> Iterator[Example]:
    """Warm-start examples in training order, drawn with replacement from the train problems. The first
    ``easy_steps`` batches use one-digit operands only: the model learns where the operands are on the small
    facts before it has to carry."""
    rng = random.Random(spec.seed)
    encode = _ChatEncoder(tokenizer)
    easy = [p for p in problems if one_digit_operands(p)] or problems
    for i in range(spec.max_steps * spec.batch_size):
        pool = easy if i < spec.easy_steps * spec.batch_size else problems
        yield encode(example_chat(rng.choice(pool), spec, rng, problems))


def _batches(examples: Iterator[Example], batch_size: int, rng: random.Random) -> Iterator[tuple[torch.Tensor, ...]]:
    """Padded (input_ids, attention_mask, labels). Batches are cut from windows of similar-length examples
    (threads are ~5x longer than first-turn chats: padding to the longest would waste most of the compute);
    batch order is shuffled within a window only, so the curriculum order survives."""
    while window := list(itertools.islice(examples, batch_size * 16)):
        window.sort(key=lambda ex: len(ex[0]))
        chunks = [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (ids, row_labels) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                labels[row, : len(ids)] = torch.tensor(row_labels)
            yield input_ids, mask, labels


def _validation_score(model: Any, tokenizer: Any, spec: TinyModelSpec, problems: list[Problem]) -> float:
    """What the warm-start aims at: a solver's greedy turn-1 accuracy, a conductor's sampled parse rate (a carded
    conductor's: the lower of that and how often it asks a worker holding the card it named, and of how often it asks
    the worker its reasoning named)."""
    if spec.role == "conductor":
        stats = plan_stats(sample_plans(model, tokenizer, problems, spec, seed=spec.seed))
        return min(stats["parse_rate"], stats.get("card_held_rate", 1.0), stats.get("pick_copied_rate", 1.0))
    return turn1_accuracy(model, tokenizer, problems)


def train_warm_start(model: Any, tokenizer: Any, spec: TinyModelSpec, problems: list[Problem]) -> dict[str, Any]:
    """Supervised warm-start (AdamW, warmup + cosine decay over ``max_steps``). Stops as soon as the accuracy on
    the validation split (``_validation_score``) reaches ``target_accuracy``, so RL starts from a model that is right
    about half the time whatever the task difficulty, and easy tasks build fast."""
    torch.manual_seed(spec.seed)
    validation = arithmetic_problems(spec.task, "validation", NUM_VALIDATION)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / spec.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / spec.max_steps)),
    )
    step, smoothed, accuracy = 0, float("nan"), 0.0
    batches = _batches(_examples(tokenizer, spec, problems), spec.batch_size, random.Random(spec.seed))
    for step, (input_ids, mask, labels) in enumerate(batches, start=1):
        model.train()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss.item()
        if step % spec.eval_every == 0 or step == spec.max_steps:
            accuracy = _validation_score(model, tokenizer, spec, validation)
            if accuracy >= spec.target_accuracy:
                break
    model.eval()
    return {"steps": step, "validation_accuracy": accuracy, "final_loss": round(smoothed, 4)}
