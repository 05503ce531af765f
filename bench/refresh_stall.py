"""Refresh stall: trainer wall time lost to index refreshes, asynchronous vs stop-the-world.

One run, one config, one Ray session: the same pre-training (same ICT start, seed, steps and
refresh interval) twice through the cluster path (`cluster/run.py`), once with
`refresh.mode=async` (trainers publish the doc encoder and go on; embedding workers re-embed
beside them) and once with `refresh.mode=sync` (trainers publish, then wait until the new index
is served: the stop-the-world baseline). Reported per mode: trainer loop wall time, the seconds
the trainer was blocked (publish + waiting for the index; in async also any wait forced by
`refresh.max_staleness`), that as a fraction of wall time, refreshes completed, mean refresh
duration and s/step; then the ratios sync/async.

On a machine where trainers and embedding workers share cores (this 2-core box), async refresh
still costs the trainer CPU time while workers embed: that shows up in s/step, not in blocked
seconds, so both columns are reported.

    python bench/refresh_stall.py                       # tiny config: MiniLM, 600 blocks, 60 steps
    python bench/refresh_stall.py --smoke               # random 1-layer BERT, seconds (CI)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, add_common_args, apply_common_args, print_table, write_results  # noqa: E402
from trainer.config import SMOKE_RUN  # noqa: E402

SMOKE = [*SMOKE_RUN, "pretrain.batch_size=4", "refresh.max_staleness=2"]  # async must refresh within 6 steps too


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=15, help="refresh.every_steps")
    p.add_argument("--work-dir", help="where the two runs go (default: a temp dir, removed afterwards)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for both runs")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    apply_common_args(a)
    import ray

    from cluster.config import load_config
    from cluster.run import connect, pretrain_on_ray
    from indexer.blocks import BlockStore
    from trainer.ict import ict
    from trainer.prepare import prepare

    steps, every = (6, 2) if a.smoke else (a.steps, a.every)
    # The retriever trains from the first step: refreshes are skipped while it is frozen.
    overrides = ["pretrain.freeze_retriever_steps=0", *(SMOKE if a.smoke else []), *a.overrides,
                 f"pretrain.steps={steps}", f"refresh.every_steps={every}", f"pretrain.checkpoint_every={10 ** 9}",
                 "cluster.backend=ray", f"pretrain.log_every={max(1, steps // 10)}"]
    if a.threads:
        overrides.append(f"threads={a.threads}")
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="refresh-stall-"))
    base = load_config(a.config, [*overrides, f"run_dir={work / 'base'}"])
    prepare(base)
    ict(base)
    n_blocks = len(BlockStore(work / "base" / "blocks"))
    connect(base)  # one Ray session for both modes: actor start-up is not part of either
    rows = []
    try:
        for mode in ("async", "sync"):
            run_dir = work / mode
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(work / "base", run_dir)
            cfg = load_config(a.config, [*overrides, f"run_dir={run_dir}", f"refresh.mode={mode}"])
            s = pretrain_on_ray(cfg)
            blocked = s["refresh_blocked"] + s["staleness_wait"]
            history = s["refresh_history"]
            rows.append({"refresh mode": mode, "steps": s["steps"], "refreshes": s["refreshes"],
                         "trainer wall s": s["seconds"], "blocked s": blocked,
                         "blocked % of wall": 100 * blocked / s["seconds"], "s/step": s["seconds"] / s["steps"],
                         "mean refresh s": sum(r["swap_seconds"] for r in history) / max(1, len(history)),
                         "max staleness": s["max_staleness"]})
    finally:
        ray.shutdown()
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    sync, asyn = rows[1], rows[0]
    rows.append({"refresh mode": "sync / async", "trainer wall s": sync["trainer wall s"] / asyn["trainer wall s"],
                 "blocked s": sync["blocked s"] / max(asyn["blocked s"], 1e-9),
                 "blocked % of wall": sync["blocked % of wall"] / max(asyn["blocked % of wall"], 1e-9),
                 "s/step": sync["s/step"] / asyn["s/step"]})
    c = base.cluster
    config = {"config": Path(a.config).name, "steps": steps, "refresh.every_steps": every,
              "max_staleness": base.refresh.max_staleness, "blocks": n_blocks, "trainers": c.trainers,
              "embedding_workers": c.embedding_workers, "embed_threads": c.embed_threads, "shards": c.shards,
              "threads": base.threads, "smoke": a.smoke, "overrides": " ".join(a.overrides) or "-"}
    notes = ["blocked s = trainer seconds spent publishing the doc encoder and waiting for the index "
             "(sync: every refresh; async: only beyond refresh.max_staleness)",
             "trainers and embedding workers share this machine's cores: async refresh still slows steps "
             "while workers embed (s/step), which the blocked column does not count"]
    print_table("Refresh stall: asynchronous vs stop-the-world", rows)
    write_results("Refresh stall: asynchronous vs stop-the-world", config, rows, a.results, notes=notes)
    return rows


if __name__ == "__main__":
    main()
