"""Step metrics: one JSON line per event in run_dir/events.jsonl, mirrored to W&B when enabled.

W&B runs offline unless `wandb.mode=online`; the API key is read by wandb from its own
environment/netrc and never passes through our config, logs or the run directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str | Path, job: str, cfg=None):
        self.path = Path(run_dir) / "events.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.job = job
        self._wandb = None
        if cfg is not None and cfg.wandb.enabled:
            import wandb

            from core.schema import to_dict

            self._wandb = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(run_dir),
                                     config=to_dict(cfg), job_type=job, reinit=True)

    def log(self, step: int, **values) -> None:
        record = {"job": self.job, "step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"{self.job}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
