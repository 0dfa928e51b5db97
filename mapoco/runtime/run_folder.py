"""A run's folder (``output_dir``): made and proved writable before any actor starts, and written so that a reader
never sees half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mapoco.config import ConfigError, check_writable_dir


def check_output_dir(out: Path) -> None:
    """Fail fast, creating nothing, if ``out`` cannot become a writable directory (``mapoco.config``'s check of
    ``output_dir``: a file in the way, an unwritable ancestor, a read-only or virtual filesystem)."""
    check_writable_dir("output_dir", out)


def prepare_output_dir(out: Path) -> None:
    """Create the run directory and prove it takes a file, before any actor starts (not after an hour)."""
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        _unwritable(out, f"{type(exc).__name__}: {exc.strerror or exc}")


def _unwritable(out: Path, why: str) -> None:
    raise ConfigError("output_dir", str(out), f"is not a writable directory ({why})")


def write_json(path: Path, payload: Any) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON record per line (transcripts), written then renamed as ``write_json`` does."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(tmp, path)
