"""Finding models: the user's model cache, known names and local folders (safetensors only), hub ids, and loading
a causal LM from a folder. Config validation needs only this, never the build code."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from mapoco.models.specs import MODEL_DIRS

MARKER = "mapoco-build.json"  # written last; its presence (with a matching fingerprint) means "complete"


def cache_dir() -> Path:
    """``$MAPOCO_CACHE`` if set, else the user's cache (``$XDG_CACHE_HOME/mapoco``, ``~/.cache/mapoco``), as the HF hub
    keeps its models: every process of the user finds what `make models` built, whatever its working directory
    (a `ray job submit` working_dir copy, an installed package)."""
    env = os.environ.get("MAPOCO_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mapoco"


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / MODEL_DIRS[name]


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name
HUB_ARCHITECTURES = Path(__file__).with_name("hub_architectures.yaml")


def resolve_model(ref: str, download: bool = True) -> Path | None:
    """A known model name -> its built folder; an existing local path -> that path; a hub id -> its snapshot in the
    HF cache, fetched first unless ``download`` is false (then None while it is not there)."""
    if ref in MODEL_DIRS:
        path = model_dir(ref)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"model '{ref}' is not built; run `make models`")
        return path
    path = Path(ref).expanduser()
    if path.exists():
        return require_safetensors(path)
    if HUB_ID.fullmatch(ref):
        return _from_hub(ref, download)
    raise FileNotFoundError(f"model '{ref}' is neither a known model ({', '.join(MODEL_DIRS)}), a local path, "
                            f"nor a hub id (org/name)")


def node_source(ref: str, path: Path) -> str:
    """What an actor loads ``ref`` (resolved here to ``path``) from on its own node: a hub id, which it fetches into
    that node's HF cache (the snapshot path exists only where it was downloaded), else the path, which must exist
    there as well (MAPOCO_CACHE on a shared filesystem, or `make models` on each node)."""
    return ref if HUB_ID.fullmatch(ref) and not Path(ref).expanduser().exists() else str(path)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def require_safetensors(path: Path) -> Path:
    """A model folder a user names must hold safetensors weights: pickled ones (``pytorch_model.bin``) can run
    code when loaded, so they are refused, never loaded. Every load also passes ``use_safetensors=True``."""
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickled = sorted(str(f.name) for pattern in PICKLE_WEIGHTS for f in path.glob(pattern))
        held = f"it holds {', '.join(pickled)} (pickle, refused)" if pickled else "it holds no *.safetensors"
        raise FileNotFoundError(f"model folder '{path}' has no safetensors weights: {held}; save the model with "
                                f"save_pretrained(..., safe_serialization=True)")
    return path


def load_causal_lm(path: str | Path, dtype: Any) -> Any:
    """A causal LM from a local folder, from safetensors only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)


def lora_support(architecture: str) -> bool:
    """Whether vLLM serves LoRA adapters for a model architecture (config.json's ``architectures``). vLLM's registry
    is the only source of truth; importing it costs the driver ~15 s on 2 cores, so only the shared LoRA engine
    asks."""
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import ModelRegistry

    model_cls = ModelRegistry._try_load_model_cls(architecture)
    return model_cls is not None and supports_lora(model_cls)


def _from_hub(repo_id: str, download: bool) -> Path | None:
    """A hub model's local snapshot (downloaded once into the HF cache; HF_HUB_OFFLINE=1 uses the cache only)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                                "*.model"], local_files_only=not download))
    except Exception as exc:  # offline without a cached copy, no such repo, no access
        if not download:
            return None
        raise FileNotFoundError(f"model '{repo_id}' could not be fetched from the hub ({type(exc).__name__}); "
                                f"download it where there is network, or give a local path") from None


def model_config(ref: str) -> dict[str, Any]:
    """``ref``'s config.json as a dict, from where mapoco would load it, without downloading."""
    if ref in MODEL_DIRS:
        path = model_dir(ref) / "config.json"
    elif Path(ref).expanduser().is_dir():
        path = Path(ref).expanduser() / "config.json"
    elif HUB_ID.fullmatch(ref):
        path = _cached_hub_config(ref)
        if path is None:
            known = _hub_architectures()
            if ref not in known:
                raise FileNotFoundError(f"model '{ref}' is neither in the HF cache nor one of the hub models mapoco "
                                        f"knows the size of ({', '.join(known)}); download it first")
            return dict(known[ref])
    else:
        raise FileNotFoundError(f"model '{ref}' is neither a known model, a local folder, nor a hub id")
    if not path.is_file():
        raise FileNotFoundError(f"model '{ref}' has no config.json at {path} (run `make models`?)")
    return json.loads(path.read_text())


def _cached_hub_config(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


@functools.cache
def _hub_architectures() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(HUB_ARCHITECTURES.read_text())


def has_chat_template(path: Path) -> bool:
    """Discussions are chat threads: the tokenizer must carry a chat template (file or tokenizer_config key)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))
