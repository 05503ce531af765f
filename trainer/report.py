"""`launch.py report RUN_DIR`: PNG plots of the curves in events.jsonl, for runs without W&B.

One figure per job (ict, pretrain, refresh, finetune), one panel per metric against step:
loss, MLM accuracy, retrieval recall (gold in top-k) and p(z|x) entropy, index version,
staleness, refresh duration, throughput.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from core.errors import InputError

SKIP = {"job", "step", "time", "elapsed"}


def read_events(run_dir: Path) -> dict[str, list[dict]]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no events (run a training command with this run_dir first)")
    jobs: dict[str, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{lineno}: malformed event line") from None
            jobs[event.get("job", "?")].append(event)
    return jobs


def plot_job(events: list[dict], title: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for e in events for k, v in e.items()
                   if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        return []
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(e["step"], e[key]) for e in events if isinstance(e.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return keys


def report(run_dir: str | Path) -> dict[str, str]:
    """Write run_dir/report/<job>.png for every job in events.jsonl; returns job -> path."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    written = {}
    for job, events in read_events(run_dir).items():
        # a resumed or repeated job logs a step again: the later record wins
        latest = sorted({e["step"]: e for e in events}.values(), key=lambda e: e["step"])
        path = out_dir / f"{job}.png"
        if plot_job(latest, f"{run_dir.name}: {job}", path):
            written[job] = str(path)
    return written
