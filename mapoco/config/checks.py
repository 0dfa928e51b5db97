"""The validators' building blocks: a failed check is a ConfigError naming the key, the value and what is
allowed; and the checks of things outside the config (folders, model files, addresses)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mapoco.config.schema import ConfigError


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def require_name(key: str, value: str | None, allowed: str = "a non-empty name") -> None:
    """A name that is not blank (None passes: the optional keys' default)."""
    require(value is None or bool(value.strip()), key, value, allowed)


def require_host(key: str, host: str) -> None:
    require(re.fullmatch(r"[^\s/]+", host) is not None, key, host,
            "an address to bind, e.g. 127.0.0.1 (0.0.0.0: every interface)")


def require_env_name(key: str, value: str | None) -> None:
    require(value is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) is not None, key, value,
            "the name of an environment variable (letters, digits and _), or null")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_model(key: str, ref: str, download: bool = False) -> Path | None:
    """The model's folder; None for a hub model not downloaded yet, which is checked once fetched
    (``check_models``, after the cluster is known to hold the run: nothing downloads for a run that cannot start)."""
    from mapoco.models.registry import resolve_model

    try:
        return resolve_model(ref, download)
    except FileNotFoundError as exc:
        raise ConfigError(key, ref, str(exc)) from None


def require_weights_folder(key: str, path: str) -> None:
    """A learned model a user points at exists and holds safetensors, not pickled weights."""
    from mapoco.models.registry import require_safetensors

    folder = Path(path).expanduser()
    require(folder.is_dir(), key, path, "no such folder")
    try:
        require_safetensors(folder)
    except FileNotFoundError as exc:
        raise ConfigError(key, path, str(exc)) from None


def is_ray_address(address: str) -> bool:
    if address in ("auto", "local"):
        return True
    try:
        parts = urlsplit(address if address.startswith("ray://") else f"ray://{address}")
        return bool(parts.hostname) and 1 <= (parts.port or 0) and not parts.path
    except ValueError:  # a port that is not a number in 0..65535
        return False


# Kernel views, not storage: a directory there cannot hold a run (root may even pass os.access on them).
VIRTUAL_FILESYSTEMS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                                 "securityfs", "configfs", "pstore", "bpf", "efivarfs", "mqueue", "hugetlbfs",
                                 "fusectl", "binfmt_misc"})


def check_writable_dir(key: str, path: str | Path) -> None:
    """Fail fast, creating nothing, if ``path`` cannot become a writable directory: its nearest existing ancestor (or
    itself) must be a directory, writable, on a filesystem that is neither read-only nor virtual (/proc, /sys)."""
    out = Path(path).expanduser().absolute()
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    why = _unwritable_because(existing)
    require(why is None, key, str(path), f"is not a writable directory ({why})")


def _unwritable_because(existing: Path) -> str | None:
    if not existing.is_dir():
        return f"{existing} is not a directory"
    fstype = _filesystem_type(existing.resolve())
    if fstype in VIRTUAL_FILESYSTEMS:
        return f"{existing} is on a virtual filesystem ({fstype})"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{existing} is on a read-only filesystem"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem that holds ``path`` (absolute, resolved): its innermost mount in /proc/self/mounts
    (None where that cannot be read)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    found, depth = None, -1
    for line in mounts:
        point, fstype = line.split()[1:3]
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)  # octal escapes: \040 is a space
        if path.is_relative_to(point) and len(point) >= depth:  # the later of two mounts on one point is on top
            found, depth = fstype, len(point)
    return found
