"""Masked salient spans on held-out text, one reader and several retrievers side by side in one run.

The reader is the pre-trained REALM model's (`eval.model`, default realm); each row changes only where its
candidates come from: REALM's own retriever, the ICT retriever (`eval.retriever=ict`, its own index), the
store's BM25 index and the hybrid of BM25 and REALM's (`retrieval.mode`), and no retrieval at all (the null
document alone). Each row is `launch.py evaluate` (task=mlm) on the same examples: prepare's held-out
examples (with `data.eval_split=documents`, sentences of articles pre-training never read; the sentence's
own block is excluded as in pre-training) or `data.eval=FILE`.
  masked-span accuracy  every masked wordpiece of the span predicted by the marginal over the candidates
  span in top-k         the span's wordpieces occur, in order, in one of the k candidates
  accuracy, span (not) in top-k   masked-span accuracy where it does (does not): reading apart from finding
  recall@k              a candidate is the example's gold document (only where the examples name one)
Prepends the table to docs/RESULTS.md (machine, commit, date).

    python -m bench.heldout_spans --config configs/wiki_vital.yaml [dotted.key=value ...]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, markdown_table, write_results  # noqa: E402  (sets the offline environment)

# isort: split
from bench.retrieval_compare import HEADER  # noqa: E402
from cluster.config import load_config  # noqa: E402
from core.errors import InputError  # noqa: E402
from trainer.evaluate import evaluate_masked_spans  # noqa: E402

# (row, overrides): the reader stays eval.model's; only the candidates change
RETRIEVERS = [("REALM retriever", []), ("ICT retriever", ["eval.retriever=ict"]),
              ("BM25", ["retrieval.mode=bm25"]), ("hybrid: BM25 + REALM", ["retrieval.mode=hybrid"])]


def blank(value):
    return "" if value is None else value


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "wiki_vital.yaml"))
    p.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"), help="markdown file to prepend to")
    p.add_argument("--pipeline", default="", help="commands of a recipe whose overrides this one skips "
                   "(as launch.py --pipeline): a script passes one set of overrides to every stage")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (evaluate's keys)")
    a = p.parse_args(argv)
    pipeline = tuple(c for c in a.pipeline.split(",") if c)
    rows, null = [], None
    for name, extra in RETRIEVERS:
        cfg = load_config(a.config, ["eval.model=realm", *a.overrides, *extra], "evaluate", pipeline)
        m = evaluate_masked_spans(cfg)
        rows.append({"retriever": name, "masked-span accuracy": m["mlm_accuracy"], "span in top-k": m["span_in_top_k"],
                     "accuracy, span in top-k": blank(m["mlm_accuracy_span_in_top_k"]),
                     "accuracy, span not in top-k": blank(m["mlm_accuracy_span_not_in_top_k"]),
                     "recall@k": blank(m["retrieval_recall_at_k"])})
        null = null or m
        print(markdown_table([rows[-1]]).splitlines()[-1], flush=True)
    rows.append({"retriever": "none (null document only)", "masked-span accuracy": null["mlm_accuracy_no_retrieval"],
                 "span in top-k": "", "accuracy, span in top-k": "", "accuracy, span not in top-k": "",
                 "recall@k": ""})
    config = {"config": a.config, "run_dir": cfg.run_dir, "reader": null["model"], "model_step": null["model_step"],
              "examples": f"{null['n']} ({null['eval_file']})", "k": null["k"]}
    notes = ["one reader (eval.model) for every row; only the candidates change (eval.retriever, retrieval.mode)",
             f"hybrid: retrieval.fusion={cfg.retrieval.fusion}, retrieval.bm25_weight={cfg.retrieval.bm25_weight:g}",
             "span in top-k: the masked span's wordpieces, in order, in one of the k candidates (own block excluded)",
             "accuracy, span (not) in top-k: masked-span accuracy over the examples whose span was (not) retrieved: "
             "the reader's reading apart from the retriever's finding",
             "none: the reader given x alone, the null document"]
    command = "python -m bench.heldout_spans " + " ".join(shlex.quote(x) for x in argv or sys.argv[1:])
    write_results(f"Masked spans on held-out text, {Path(a.config).stem}", config, rows, a.results, None, notes,
                  HEADER, command)
    print(f"\n{markdown_table(rows)}\n\nwrote {a.results}")
    return rows


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
