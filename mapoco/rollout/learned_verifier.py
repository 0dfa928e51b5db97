"""Learned verifier: a language model with a scalar head scoring (question, answer) in (0, 1), its balanced
training examples (as many right as wrong answers per question, so the model cannot score a question's difficulty
instead of the answer), its binary cross-entropy fit and its held-out accuracy and AUC. The verifier actor
serves it; `mapoco train-verifier` (``mapoco.training.verifier_training``) trains it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAX_TOKENS = 512


@dataclass(frozen=True)
class Example:
    question_id: str
    question: str
    response: str
    label: int  # 1 right, 0 wrong


class LearnedVerifier:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.truncation_side = "left"  # keep the answer, which comes last

    @classmethod
    def load(cls, path: str | Path) -> LearnedVerifier:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        return cls(AutoModelForSequenceClassification.from_pretrained(path, torch_dtype=torch.float32,
                                                                      use_safetensors=True),
                   AutoTokenizer.from_pretrained(path))

    @classmethod
    def from_base(cls, base: Path, seed: int) -> LearnedVerifier:
        """A fresh scalar head on a causal LM backbone (the paper starts the verifier from a pretrained LM), drawn
        from ``seed`` alone: not from whatever the process's random state was."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=1, torch_dtype=torch.float32, pad_token_id=tokenizer.pad_token_id,
                use_safetensors=True)
        return cls(model, tokenizer)

    def _encode(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
            )
            for q, a in pairs
        ]
        return self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt",
                              add_special_tokens=False)

    def logits(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        return self.model(**self._encode(pairs)).logits.squeeze(-1)

    @torch.no_grad()
    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        return torch.sigmoid(self.logits(pairs)).tolist()

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)


def balance(examples: list[Example], seed: int) -> list[Example]:
    """Per question, as many right as wrong answers (the larger side is subsampled); one-sided questions drop."""
    rng = random.Random(seed)
    by_question: dict[str, list[Example]] = {}
    for ex in examples:
        by_question.setdefault(ex.question_id, []).append(ex)
    kept = []
    for group in by_question.values():
        right = [e for e in group if e.label == 1]
        wrong = [e for e in group if e.label == 0]
        n = min(len(right), len(wrong))
        kept += rng.sample(right, n) + rng.sample(wrong, n)
    return kept


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random right answer outscores a random wrong one (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def evaluate_verifier(verifier: LearnedVerifier, examples: list[Example], batch_size: int) -> dict[str, float]:
    scores = np.concatenate([
        verifier.score([(e.question, e.response) for e in examples[i : i + batch_size]])
        for i in range(0, len(examples), batch_size)
    ]) if examples else np.zeros(0)
    labels = np.array([e.label for e in examples])
    return {"accuracy": float(((scores > 0.5) == labels).mean()) if len(labels) else float("nan"),
            "auc": auc(labels, scores), "num_examples": len(examples)}


def fit(verifier: LearnedVerifier, examples: list[Example], epochs: int, lr: float, batch_size: int,
        seed: int) -> list[float]:
    """Binary cross-entropy on the scalar head and backbone; returns the mean loss per epoch."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(verifier.model.parameters(), lr=lr, weight_decay=0.0)
    verifier.model.train()
    losses = []
    for _ in range(epochs):
        order = list(examples)
        rng.shuffle(order)
        epoch = []
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            logits = verifier.logits([(e.question, e.response) for e in batch])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, torch.tensor([float(e.label) for e in batch])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch.append(loss.item())
        losses.append(float(np.mean(epoch)))
    verifier.model.eval()
    return losses
