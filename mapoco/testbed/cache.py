"""Builds that are idempotent and atomic: a model is built in a scratch folder next to its final place, a completion
marker with its fingerprint is written last, and the folder is moved into place with ``os.replace``, so an
interrupted build never leaves a folder that looks finished, and a changed recipe rebuilds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapoco.models.registry import MARKER

# Bump when the build code changes in a way the specs do not show, so cached models are rebuilt.
BUILD_VERSION = 1


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr((BUILD_VERSION, *parts)).encode()).hexdigest()[:16]


def _is_complete(path: Path, fingerprint: str) -> bool:
    try:
        return json.loads((path / MARKER).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(final: Path) -> None:
    """Scratch folders of builds whose process died (killed mid-build) are garbage."""
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def atomic_build(final: Path, fingerprint: str, build: Callable[[Path], dict[str, Any]], force: bool) -> Path:
    """Run ``build(scratch)`` and move the result to ``final``; a no-op when ``final`` is complete and current."""
    if not force and _is_complete(final, fingerprint):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    scratch = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        info = build(scratch)
        marker = {"name": final.name, "fingerprint": fingerprint, "built_at": time.time(), **info}
        (scratch / MARKER).write_text(json.dumps(marker, indent=2))
        # rename(2) cannot replace a non-empty folder: move the old one aside first, delete it after.
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(scratch, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final
