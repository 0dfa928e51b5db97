"""Weight movement helpers that need no engine: the payload round trip and which reload warnings are expected."""

from __future__ import annotations

import logging

import torch

from mapoco.weights.payload import pack, unpack
from mapoco.weights.reload import _quiet_expected_reload_warnings

LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"


def test_payload_round_trip_keeps_values_dtypes_and_shapes():
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0])}
    back = unpack(pack(state, torch.bfloat16))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in back.items()} == {"a": (torch.bfloat16, (2, 3)),
                                                                      "b": (torch.bfloat16, (2,))}
    assert torch.equal(back["a"].float(), state["a"]) and torch.equal(back["b"].float(), state["b"])


def _warn_for(layers: list[str]) -> None:
    logger = logging.getLogger(LAYERWISE)
    for layer in layers:
        logger.warning("%s: Failed to load weights", layer)


def test_only_the_expected_reload_warnings_are_silenced(caplog):
    caplog.set_level(logging.WARNING, logger=LAYERWISE)
    with _quiet_expected_reload_warnings(tied=True):
        _warn_for(["RotaryEmbedding", "ParallelLMHead", "QKVParallelLinear"])
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights"]
    caplog.clear()
    with _quiet_expected_reload_warnings(tied=False):  # an untied head that got nothing is a real problem
        _warn_for(["RotaryEmbedding", "ParallelLMHead"])
    assert [r.getMessage() for r in caplog.records] == ["ParallelLMHead: Failed to load weights"]
    caplog.clear()
    _warn_for(["RotaryEmbedding"])  # outside a reload nothing is filtered
    assert len(caplog.records) == 1
