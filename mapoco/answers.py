"""Answer extraction and correctness: ``\\boxed{...}``, ``#### n``, NLI labels; math checked by math-verify."""

from __future__ import annotations

import re

from math_verify import ExprExtractionConfig, parse, verify

NLI_LABELS = ("entailment", "neutral", "contradiction")
_HASH_ANSWER = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_NLI = re.compile(r"\b(" + "|".join(NLI_LABELS) + r")\b", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, with nested braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _clean_number(raw: str) -> str:
    value = raw.strip().rstrip(".").replace(",", "").replace("$", "")
    return value


def extract_math(text: str) -> str | None:
    """The model's final math answer: boxed, else ``#### n``, else the last number in the text."""
    boxed = last_boxed(text)
    if boxed:
        return _clean_number(boxed)
    hashed = _HASH_ANSWER.findall(text)
    if hashed:
        return _clean_number(hashed[-1])
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else None


def extract_nli(text: str) -> str | None:
    labels = _NLI.findall(text)
    return labels[-1].lower() if labels else None


def extract_answer(text: str, kind: str) -> str | None:
    return extract_nli(text) if kind == "nli" else extract_math(text)


def _as_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def is_correct(pred: str | None, gold: str, kind: str) -> bool:
    """Exact label match for NLI; for math a fast numeric check, then math-verify for symbolic forms.

    math-verify's own timeouts use SIGALRM, which only works on the main thread; they are turned off here and
    callers (the verifier actor) bound the time of a call themselves.
    """
    if pred is None:
        return False
    if kind == "nli":
        return pred == gold
    gold_f, pred_f = _as_float(gold), _as_float(pred)
    if gold_f is not None and pred_f is not None:
        return abs(gold_f - pred_f) <= 1e-6 * max(1.0, abs(gold_f))
    config = [ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = parse(f"${pred}$", parsing_timeout=None) or parse(pred, config, parsing_timeout=None)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
