"""Metrics out: wandb (offline unless ``logger.wandb.mode=online``) and the same rows in ``metrics.jsonl``.

``wandb_run.json`` in the run directory names the wandb run (id, name, group), so a sweep's runs can be found.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mapoco.config import RunConfig
from mapoco.runtime.run_folder import write_jsonl


class Tracker:
    def __init__(self, cfg: RunConfig, out: Path, resumed_at: int | None):
        """``resumed_at``: the step a resumed run restarts from (None: a fresh run)."""
        self.path = out / "metrics.jsonl"
        self._keep_rows_until(resumed_at)
        resumed = resumed_at is not None
        self.run = None
        wandb_cfg = cfg.logger.wandb
        if wandb_cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=wandb_cfg.project,
                group=wandb_cfg.group,
                mode=wandb_cfg.mode,
                dir=str(out),
                config=dataclasses.asdict(cfg),
                name=wandb_cfg.name or out.name,
                resume="allow" if resumed else None,
                id=_run_id(out),
                # wandb's banner and end-of-run history fill a screen; the run's folder and how to sync it are
                # printed once below (logger.show_logs brings wandb's own output back).
                settings=wandb.Settings(silent=not cfg.logger.show_logs, console="off"),
            )
            run_info = {"id": self.run.id, "name": self.run.name, "group": self.run.group, "mode": wandb_cfg.mode,
                        "project": wandb_cfg.project}
            (out / "wandb_run.json").write_text(json.dumps(run_info, indent=2))
            where = f"wandb sync {self.run.dir.removesuffix('/files')}" if wandb_cfg.mode == "offline" else self.run.url
            print(f"wandb: {wandb_cfg.mode} run {self.run.name} ({where})", flush=True)

    def _keep_rows_until(self, step: int | None) -> None:
        """A fresh run in a used folder starts the file over; a resumed one keeps the rows up to its checkpoint (the
        steps after it, which the stopped run may have logged, are logged again as they are redone)."""
        if not self.path.exists():
            return
        rows = [] if step is None else [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        write_jsonl(self.path, [row for row in rows if row["step"] <= step])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _run_id(out: Path) -> str:
    """A stable id per output directory, so a resumed job continues the same wandb run."""
    import hashlib

    return hashlib.blake2b(str(out.resolve()).encode(), digest_size=6).hexdigest()
