"""End-to-end demo wall time: prepare -> ICT -> pre-training (>= 3 refreshes) -> fine-tuning ->
evaluation, each stage a `launch.py` command as a user runs it (process start-up included). It is also the
learning benchmark: the ICT model is evaluated before pre-training, so one run gives ICT's and REALM's figures.

    python bench/e2e_demo.py                 # the tiny config, unchanged (about 40 min on 2 CPU cores)
    python bench/e2e_demo.py --smoke         # random 1-layer BERT, 40 entities (CI)
    python bench/e2e_demo.py data.synthetic_entities=2000 data.synthetic_relations=confusable \
        data.synthetic_phrasing=disjoint     # the harder generator: new wordings, 8 facts a person
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, add_common_args, apply_common_args, print_table, write_results  # noqa: E402
from core.env import OFFLINE_ENV  # noqa: E402
from trainer.config import SMOKE_RUN  # noqa: E402

SMOKE = [*SMOKE_RUN, "pretrain.batch_size=4", "pretrain.steps=8", "refresh.every_steps=2", "finetune.steps=4",
         "finetune.batch_size=4", "data.max_eval_examples=20", "cluster.backend=local"]  # Ray: tests/test_cluster.py
STAGES = [("prepare", []), ("ict", []), ("evaluate", ["eval.model=ict"]), ("pretrain", []),
          ("evaluate", ["eval.model=realm"]), ("finetune", []), ("evaluate", ["task=openqa"])]


def run_stages(config: str, overrides: list[str], run_dir: Path, stages=STAGES) -> list[dict]:
    """Each stage as a `launch.py` process with one set of overrides (run_dir=... appended): a row per
    stage with its seconds, a one-line detail and `data` (the evaluation's metrics.json, or
    pretrain_summary.json). A failing stage stops with its stderr's tail."""
    env = dict(os.environ, **OFFLINE_ENV)
    pipeline = ",".join(dict.fromkeys(c for c, _ in stages))
    rows = []
    for command, extra in stages:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), command, "--config", config,
                               "--pipeline", pipeline, *overrides, f"run_dir={run_dir}", *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{command} failed:\n{proc.stderr[-3000:]}")
        row = {"stage": " ".join([command, *extra]), "seconds": seconds}
        if command == "pretrain":
            s = json.loads((run_dir / "pretrain_summary.json").read_text()) \
                if (run_dir / "pretrain_summary.json").is_file() else {}
            row["detail"] = (f"{s.get('steps', '?')} steps, {s.get('refreshes', '?')} refreshes, blocked "
                             f"{s.get('refresh_blocked', 0) + s.get('staleness_wait', 0):.1f} s")
            row["data"] = s
        elif command == "evaluate":
            m = json.loads((run_dir / "metrics.json").read_text())
            keys = ("exact_match", "retrieval_recall_at_k") if "exact_match" in m else \
                ("mlm_accuracy", "mlm_accuracy_no_retrieval", "retrieval_recall_at_k")
            row["detail"] = ", ".join(f"{k} {m[k]:.3f}" for k in keys if m.get(k) is not None)
            row["data"] = m
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--run-dir", help="default: a temp dir, removed afterwards")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    apply_common_args(a)
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="e2e-")) / "run"
    overrides = [*(SMOKE if a.smoke else []), *a.overrides]
    if a.threads:
        overrides.append(f"threads={a.threads}")
    try:
        rows = [{k: v for k, v in r.items() if k != "data"} for r in run_stages(a.config, overrides, run_dir)]
        total = sum(r["seconds"] for r in rows)
        rows.append({"stage": "total", "seconds": total, "detail": f"{total / 60:.1f} min"})
    finally:
        if not a.run_dir:
            shutil.rmtree(run_dir.parent, ignore_errors=True)
    print_table("End-to-end demo", rows)
    write_results("End-to-end demo wall time", {"config": Path(a.config).name, "smoke": a.smoke,
                                                "overrides": " ".join(a.overrides) or "-"}, rows, a.results,
                  notes=["each stage is one `launch.py` process (interpreter, torch and Ray start-up included)"])
    return rows


if __name__ == "__main__":
    main()
