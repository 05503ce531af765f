"""REALM's Table 2 ablations on the confusable synthetic corpus: each variant changes one thing of the tiny
recipe (configs/tiny.yaml), same seed and step budget, and runs the whole pipeline of bench/e2e_demo.py
(prepare -> ICT -> pretrain -> evaluate -> finetune -> evaluate task=openqa, launch.py processes).

    python bench/ablations.py                          # every variant (hours on 2 CPU cores); resumable
    python bench/ablations.py --variants reference,no_null_doc --seeds 1
    python bench/ablations.py --smoke                  # random 1-layer BERT, 8 steps, two variants (CI)

A finished variant's result is kept in --record as <variant>-seed<N>.json (default bench/ablation_results/,
kept in git: a table that takes several sessions of 2 cores survives a fresh checkout); a variant found there
is not run again ("skipped" is printed), and one that stopped part-way starts over. The run dirs (checkpoints,
indexes) live under --work and are not needed once the result is recorded. Masked-span accuracy is always
scored on the held-out statements' given answers (unseen people), whatever a variant masks in pre-training.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, add_common_args, apply_common_args, commit_info, print_table, write_results  # noqa: E402
from bench.e2e_demo import SMOKE, STAGES, run_stages  # noqa: E402
from cluster.config import load_config  # noqa: E402
from core.files import atomic_write_json  # noqa: E402

CORPUS = ["data.synthetic_relations=confusable", "data.synthetic_phrasing=disjoint"]
STALE_FACTOR = 30
VARIANTS = ("reference", "random_spans", "uniform", "stale_index", "sync_refresh", "no_ict", "frozen_retriever",
            "no_null_doc")
MULTI_SEED = ("reference", "stale_index")  # --seeds applies to these; the others run the config's seed once
SMOKE_VARIANTS = ("reference", "no_null_doc")
# ICT's own evaluation is left out: frozen_retriever's recall is the ICT retriever's, and no variant reads it
ABLATION_STAGES = [s for s in STAGES if s != ("evaluate", ["eval.model=ict"])]
SPREAD = (("mlm_acc", "mlm_accuracy"), ("recall@k", "retrieval_recall_at_k"), ("openqa_em", "exact_match"))
METRICS = ("mlm_accuracy", "mlm_accuracy_no_retrieval", "retrieval_recall_at_k", "exact_match")


def variant_overrides(name: str, cfg) -> list[str]:
    """The one change a variant makes to the recipe `cfg` (the loaded base config)."""
    r, p = cfg.refresh, cfg.pretrain
    return {
        "reference": [],
        "random_spans": ["masking.mode=random"],
        "uniform": ["masking.mode=uniform"],
        # the staleness bound scales with the schedule: at tiny's bound the trainer would wait for a refresh
        # that is never published
        "stale_index": [f"refresh.every_steps={r.every_steps * STALE_FACTOR}",
                        f"refresh.max_staleness={max(r.max_staleness * STALE_FACTOR, p.steps)}"],
        "sync_refresh": ["refresh.mode=sync"],
        "no_ict": ["pretrain.init=raw"],
        "frozen_retriever": [f"pretrain.freeze_retriever_steps={p.steps}"],
        "no_null_doc": ["pretrain.null_document=false"],
    }[name]


def mean_staleness(run_dir: Path) -> float | None:
    """Mean over the logged pre-training steps of the index's staleness (doc-tower updates it has not seen)."""
    path = run_dir / "events.jsonl"
    values = [e["staleness"] for line in (path.read_text().splitlines() if path.is_file() else [])
              if (e := json.loads(line)).get("job") == "pretrain" and e.get("staleness") is not None]
    return statistics.fmean(values) if values else None


def run_variant(name: str, seed: int, config: str, overrides: list[str], work: Path,
                record: Path) -> tuple[dict, bool]:
    """One variant at one seed: its result (read back when `record` holds it) and whether it ran now."""
    out = work / f"{name}-seed{seed}"
    done = record / f"{name}-seed{seed}.json"
    recipe = {"config": Path(config).name, "overrides": overrides}  # what every variant shares
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("recipe") != recipe:  # never a table that mixes recipes
            raise SystemExit(f"{done}: recorded for {result.get('recipe')}, not this run's {recipe}: give another "
                             f"--record directory (or delete the file to run it again)")
        return result, False
    shutil.rmtree(out, ignore_errors=True)  # a variant stopped part-way starts over
    run_dir = out / "run"
    run_dir.mkdir(parents=True)
    extra = variant_overrides(name, load_config(config, overrides))
    t0 = time.perf_counter()
    rows = run_stages(config, [*overrides, *extra, f"seed={seed}"], run_dir, ABLATION_STAGES)
    wall = time.perf_counter() - t0
    by_stage = {r["stage"]: r.get("data", {}) for r in rows}
    realm, qa, summary = by_stage["evaluate eval.model=realm"], by_stage["evaluate task=openqa"], by_stage["pretrain"]
    result = {"variant": name, "seed": seed, "recipe": recipe, "overrides": extra, "wall_s": wall,
              "commit": commit_info(),
              **{k: realm.get(k) for k in METRICS[:3]}, "exact_match": qa.get("exact_match"),
              "qa_recall_at_k": qa.get("retrieval_recall_at_k"), "refreshes": summary.get("refreshes"),
              "blocked_s": summary.get("refresh_blocked", 0) + summary.get("staleness_wait", 0),
              "pretrain_s": summary.get("wall_seconds", summary.get("seconds")),
              "mean_staleness": mean_staleness(run_dir),
              "stages": [{k: v for k, v in r.items() if k != "data"} for r in rows]}
    record.mkdir(parents=True, exist_ok=True)
    atomic_write_json(done, result)  # written last: its presence means the variant finished
    return result, True


def table_row(name: str, results: list[dict]) -> dict:
    def mean(key):
        vals = [r[key] for r in results if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    row = {"variant": name, "seeds": len(results), "changes": " ".join(results[0]["overrides"]) or "-"}
    row.update({"mlm_acc": mean("mlm_accuracy"), "mlm_acc_no_retrieval": mean("mlm_accuracy_no_retrieval"),
                "recall@k": mean("retrieval_recall_at_k"), "openqa_em": mean("exact_match")})
    # run-to-run spread (max - min over the seeds) of each learning metric; empty for a single seed
    for key, metric in SPREAD:
        vals = [r[metric] for r in results if r.get(metric) is not None]
        row[f"{key}_spread"] = max(vals) - min(vals) if len(vals) > 1 else None
    row.update({"wall_min": mean("wall_s") / 60, "pretrain_s": mean("pretrain_s"), "blocked_s": mean("blocked_s"),
                "refreshes": mean("refreshes"), "mean_staleness": mean("mean_staleness"),
                # a resumed table gathers variants run at different times: each one's code is named
                "commits": " ".join(sorted({r.get("commit", "unrecorded") for r in results}))})
    return row


def bar_chart(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return None
    keys = [("mlm_acc", "masked-span acc"), ("recall@k", "recall@k"), ("openqa_em", "Open-QA EM")]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 3.5))
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        spread = [(r.get(f"{key}_spread") or 0) / 2 for r in rows]  # half the seeds' range either side of the mean
        ax.bar([j + (i - 1) * width for j in range(len(rows))], [r.get(key) or 0 for r in rows], width, label=label,
               yerr=spread, capsize=2)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_title("REALM ablations (held-out people; whiskers: range over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all; --smoke: "
                                      f"{', '.join(SMOKE_VARIANTS)})")
    p.add_argument("--seeds", type=int, default=2, help=f"seeds for {' and '.join(MULTI_SEED)} (the others: 1)")
    p.add_argument("--work", help="where the variants' run dirs live (resumable; default runs/ablations, "
                                  "--smoke: a temp dir)")
    p.add_argument("--record", help="finished variants' results, read and written (default "
                                    "bench/ablation_results; --smoke: <work>/results)")
    p.add_argument("--chart", help="bar chart PNG (default docs/ablations.png; --smoke: in --work)")
    p.add_argument("overrides", nargs="*", help="applied to every variant, before its own change")
    a = p.parse_args(argv)
    apply_common_args(a)
    names = a.variants.split(",") if a.variants else list(SMOKE_VARIANTS if a.smoke else VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or a.seeds < 1:
        p.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})" if unknown
                else "--seeds: at least 1")
    work = Path(a.work or (tempfile.mkdtemp(prefix="ablations-") if a.smoke else ROOT / "runs" / "ablations"))
    overrides = [*(SMOKE if a.smoke else []), *(["pretrain.log_every=2"] if a.smoke else []), *CORPUS,
                 *a.overrides, *([f"threads={a.threads}"] if a.threads else [])]
    base = load_config(a.config, overrides)
    record = Path(a.record) if a.record else (work / "results" if a.smoke else ROOT / "bench" / "ablation_results")
    rows = []
    for name in names:
        seeds = [base.seed + i for i in range(a.seeds if name in MULTI_SEED else 1)]
        results = []
        for seed in seeds:
            result, ran = run_variant(name, seed, a.config, overrides, work, record)
            print(f"{'ran' if ran else 'skipped'} {name} seed {seed}: {result['wall_s']:.0f} s"
                  + ("" if ran else f" (recorded in {record})"), flush=True)
            results.append(result)
        rows.append(table_row(name, results))
    stale_every = base.refresh.every_steps * STALE_FACTOR
    notes = [f"corpus: {', '.join(CORPUS)}; recipe {Path(a.config).name} + {' '.join(a.overrides) or 'no overrides'}"
             f"{' + --smoke shapes' if a.smoke else ''}; each variant changes what `changes` says",
             "mlm_acc: every masked wordpiece of a held-out statement's answer right (people unseen in pre-training), "
             "under the marginal over the top-k (and the null document unless no_null_doc); recall@k: the "
             "person's document in the top-k; openqa_em: exact match after fine-tuning, held-out people",
             "*_spread: max - min of that metric over the variant's seeds (n/a for one seed): the run-to-run "
             "spread a difference between variants is read against",
             "blocked_s: trainer seconds spent waiting on refreshes (refresh_blocked + staleness_wait); "
             "mean_staleness: doc-tower updates the index had not seen, mean over the logged steps"]
    if "stale_index" in names and stale_every >= base.pretrain.steps:
        notes.append(f"stale_index: every {stale_every} steps is past the {base.pretrain.steps}-step budget, so the "
                     "index is never refreshed after ICT's (its staleness bound is lifted with it)")
    if "sync_refresh" in names and base.cluster.backend == "local":
        notes.append("cluster.backend=local refreshes stop-the-world in both modes: sync_refresh only differs "
                     "from reference on Ray")
    if "no_null_doc" in names:
        notes.append("no_null_doc: its mlm_acc_no_retrieval is the reader on x alone, which that variant never "
                     "trains (the null document has no weight in its marginal)")
    if "frozen_retriever" in names:
        notes.append("frozen_retriever: freeze_retriever_steps = pretrain.steps, so no refresh is due (refresh_due "
                     "skips frozen steps)")
    print_table("REALM ablations", rows)
    write_results("REALM ablations (Table 2)", {"config": Path(a.config).name, "smoke": a.smoke,
                                                "variants": ",".join(names), "seeds": a.seeds, "work": str(work),
                                                "record": str(record)},
                  rows, a.results, notes=notes)
    chart = bar_chart(rows, Path(a.chart) if a.chart else
                      (work / "ablations.png" if a.smoke else ROOT / "docs" / "ablations.png"))
    if chart is not None:
        print(f"chart: {chart}")
    return rows


if __name__ == "__main__":
    main()
