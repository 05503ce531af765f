"""Hybrid retrieval's fusion and BM25 weight: answer recall of each `retrieval.fusion` at each BM25 weight alpha.

retrieval.mode=hybrid fuses the model's and BM25's rankings (indexer/fusion.py): `retrieval.fusion` rrf
(reciprocal rank) or convex (min-max normalized scores), BM25's share `retrieval.bm25_weight` = alpha, the
model's 1 - alpha. This measures every pair per question set and fine-tuned model, and names the pair that
maximizes answer recall@5 on the set given as --fit (training questions; ties: recall@20, then @1; only
0 < alpha < 1, a mixture): choose on training questions, read the others, never the reverse.

    python -m bench.fusion_weights --config configs/wiki_vital.yaml --models qa qa_ict --fit nq_train \
        --questions nq_train=../shared/data/wiki_vital/nq_train.jsonl \
        --questions nq_dev=../shared/data/wiki_vital/nq_dev.jsonl \
        --questions webquestions_test=../shared/data/wiki_vital/webquestions_test.jsonl

Answer recall@k counts an answer string in a block's title or text (bench/retrieval_compare.AnswerHits).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.common import print_table, write_results  # noqa: E402
from bench.retrieval_compare import HEADER, AnswerHits, doc_embeddings, question_spec, scored_ranking, with_mode  # noqa: E402
from cluster.config import load_config  # noqa: E402
from core.files import atomic_write_bytes  # noqa: E402
from indexer.fusion import FUSIONS, fuse  # noqa: E402
from indexer.lexical import LexicalIndex  # noqa: E402
from indexer.shards import ShardedIndex  # noqa: E402
from trainer.checkpoint import load_model  # noqa: E402
from trainer.qa import read_qa  # noqa: E402
from trainer.qa_system import QASystem  # noqa: E402
from trainer.run import Run  # noqa: E402

DEPTH = 100


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--models", nargs="+", default=["qa"], help="fine-tuned models under run_dir/models")
    p.add_argument("--questions", action="append", type=question_spec, required=True, help="NAME=PATH; repeatable")
    p.add_argument("--fit", help="the question set (a --questions NAME) whose best recall@5 picks the setting")
    p.add_argument("--write-overrides", metavar="FILE", help="with --fit: write the first model's best setting "
                   "as config overrides (retrieval.fusion=... retrieval.bm25_weight=...), one line, for a script")
    p.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.5,0.6", help="BM25 weights alpha, comma-separated")
    p.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    run = Run.open(cfg)
    weights = [float(w) for w in a.weights.split(",")]
    if any(not 0 <= w <= 1 for w in weights):
        p.error(f"--weights: each from 0 to 1, got {a.weights}")
    sets = {name: read_qa(path) for name, path in a.questions}
    if a.fit and a.fit not in sets:
        p.error(f"--fit: {a.fit} is not a --questions name ({', '.join(sets)})")
    if a.write_overrides and not a.fit:
        p.error("--write-overrides: needs --fit (the question set the setting is chosen on)")
    bm25 = LexicalIndex(run.store.bm25_dir)
    lexical = {name: bm25.search([e.question for e in exs], DEPTH) for name, exs in sets.items()}
    rows, notes = [], []
    for name in a.models:
        model, meta = load_model(run.dir / "models" / name)
        model.to(run.device).eval()
        index = ShardedIndex(doc_embeddings(run, model, meta), dead=run.store.dead)
        system = with_mode(QASystem(run, model, meta, index=index), "dense")
        for set_name, exs in sets.items():
            dense = scored_ranking(system, [e.question for e in exs], DEPTH, cfg.eval.batch_size)
            hits = AnswerHits(run.store, exs)
            for fusion in FUSIONS:
                for w in weights:
                    curve = hits.curve(fuse(fusion, dense, lexical[set_name], 20, w, cfg.retrieval.rrf_k))
                    rows.append({"model": name, "questions": f"{set_name} ({len(exs)})", "fusion": fusion,
                                 "BM25 weight": w, "answer recall@1": float(curve[0]),
                                 "answer recall@5": float(curve[4]), "answer recall@20": float(curve[19])})
        if a.fit:
            # a mixture: at alpha 0 or 1 "hybrid" would be one retriever alone
            fit = [r for r in rows if r["model"] == name and r["questions"].startswith(f"{a.fit} (")
                   and 0 < r["BM25 weight"] < 1]
            if not fit:
                p.error(f"--fit: --weights has no BM25 weight strictly between 0 and 1 ({a.weights})")
            best = max(fit, key=lambda r: (r["answer recall@5"], r["answer recall@20"], r["answer recall@1"]))
            chosen = f"retrieval.fusion={best['fusion']} retrieval.bm25_weight={best['BM25 weight']:g}"
            notes.append(f"{name}: best answer recall@5 on {a.fit}: {chosen} ({best['answer recall@5']:.3f})")
            if a.write_overrides and name == a.models[0]:
                atomic_write_bytes(Path(a.write_overrides), (chosen + "\n").encode())
    config = {"config": a.config, "run_dir": cfg.run_dir, "rrf_k": cfg.retrieval.rrf_k, "depth": DEPTH}
    notes.append("BM25 weight 0 = the dense model alone (either fusion); rrf at 0.5 = both rankings alike")
    print_table("Hybrid fusion and BM25 weight", rows)
    for n in notes:
        print(n)
    write_results(f"Hybrid fusion and BM25 weight, {Path(a.config).stem}", config, rows, a.results, run.device,
                  notes, HEADER)
    return rows


if __name__ == "__main__":
    main()
