"""Hybrid retrieval's fusion weight: answer recall of reciprocal rank fusion with BM25 weighted w, dense 1.

retrieval.mode=hybrid fuses the model's and BM25's rankings with equal weights (trainer.index_client,
indexer/lexical.reciprocal_rank_fusion). This measures what another weight would give, per question set and
fine-tuned model, so a weight is chosen on training questions and read on evaluation ones, never the reverse:

    python -m bench.fusion_weights --config configs/wiki_vital.yaml --models qa qa_ict \
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
from bench.retrieval_compare import HEADER, AnswerHits, doc_embeddings, question_spec, ranking, with_mode  # noqa: E402
from cluster.config import load_config  # noqa: E402
from indexer.lexical import LexicalIndex, reciprocal_rank_fusion  # noqa: E402
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
    p.add_argument("--weights", default="0,0.25,0.5,0.75,1,1.5", help="BM25 weights, comma-separated")
    p.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    run = Run.open(cfg)
    weights = [float(w) for w in a.weights.split(",")]
    sets = {name: read_qa(path) for name, path in a.questions}
    bm25 = LexicalIndex(run.store.bm25_dir)
    lexical = {name: bm25.search([e.question for e in exs], DEPTH)[1] for name, exs in sets.items()}
    rows = []
    for name in a.models:
        model, meta = load_model(run.dir / "models" / name)
        model.to(run.device).eval()
        index = ShardedIndex(doc_embeddings(run, model, meta), dead=run.store.dead)
        system = with_mode(QASystem(run, model, meta, index=index), "dense", cfg)
        for set_name, exs in sets.items():
            dense = ranking(system, [e.question for e in exs], DEPTH, cfg.eval.batch_size)
            hits = AnswerHits(run.store, exs)
            for w in weights:
                fused = reciprocal_rank_fusion([dense, lexical[set_name]], 20, cfg.retrieval.rrf_k, [1.0, w])
                curve = hits.curve(fused)
                rows.append({"model": name, "questions": f"{set_name} ({len(exs)})", "BM25 weight": w,
                             "answer recall@1": float(curve[0]), "answer recall@5": float(curve[4]),
                             "answer recall@20": float(curve[19])})
    config = {"config": a.config, "run_dir": cfg.run_dir, "rrf_k": cfg.retrieval.rrf_k, "depth": DEPTH}
    notes = ["BM25 weight 0 = the dense model alone; 1 = retrieval.mode=hybrid as served (equal weights)"]
    print_table("Hybrid fusion weight", rows)
    write_results(f"Hybrid fusion weight, {Path(a.config).stem}", config, rows, a.results, run.device, notes, HEADER)
    return rows


if __name__ == "__main__":
    main()
