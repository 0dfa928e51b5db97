"""Engine side, inside vLLM's worker: the in-place reload every transport ends in, and the tied head re-tied."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch


def reload_model(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """``reload_weights`` (not the model's ``load_weights``) also redoes the post-load processing, e.g. CPU weight
    packing; then the tied head is re-tied. Both paths (CPU payload, NCCL broadcast) end here."""
    model = worker.get_model()
    with _quiet_expected_reload_warnings(_tied(model)):
        worker.reload_weights(weights_iterator=iter(weights))
    retie_output_head(model)


class _ExpectedReloadWarnings(logging.Filter):
    """vLLM warns "<layer>: Failed to load weights" for layers a reload sent nothing to. Two are expected on every
    sync: ``RotaryEmbedding`` (its cos/sin cache is computed, no checkpoint holds it) and, in a model with tied
    embeddings, ``ParallelLMHead`` (its tensor travels once, under the embedding's name, and is re-tied right
    after). Any other layer's warning still shows."""

    def __init__(self, tied: bool):
        super().__init__()
        self.expected = {"RotaryEmbedding", *(("ParallelLMHead",) if tied else ())}

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.expected)


@contextlib.contextmanager
def _quiet_expected_reload_warnings(tied: bool) -> Iterator[None]:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    quiet = _ExpectedReloadWarnings(tied)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _tied(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def retie_output_head(model) -> None:
    """A tied output head shares the embedding, but vLLM's reload skips ``lm_head.weight`` and never re-processes
    the head: on CPU it kept a packed copy of the *initial* embedding, so the engine's logits drifted from the
    learner's with every update (measured: logprob gap 0.9 after perturbing only the embedding). Point the head at
    the reloaded embedding and redo its post-load processing."""
    head, embedding = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embedding is None or not _tied(model):
        return
    head.weight = embedding.weight
    head.quant_method.process_weights_after_loading(head)
