"""Retrieval side by side on an Open-QA corpus: every retriever on the same blocks and questions in one run.

Rows: BM25 (bm25s); `model.init` off the shelf (all its layers, mean-pooled, cosine: no training); each
model of the run, models/ict, models/realm and the fine-tuned Open-QA models (models/qa, models/qa_ict, ...);
and for each fine-tuned model, its hybrid with BM25 (reciprocal rank fusion; retrieval only).
On `data.qa_eval`:
  recall@k         a block of the question's gold paragraph (`gold_id`) is among the top k blocks
  answer recall@5  an answer string is in one of the top 5 blocks (trainer.qa.answer_in_text)
  EM               exact match of the systems that answer (the Open-QA models, reading their top finetune.k)
Prepends a section (machine, commit, date, config, table) to docs/RESULTS.md and plots recall@k, k = 1..20.

    python -m bench.retrieval_compare --config configs/squad_open.yaml [dotted.key=value ...]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, markdown_table, write_results  # noqa: E402  (sets the offline environment)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cluster.config import Config, load_config  # noqa: E402
from core.errors import InputError  # noqa: E402
from indexer.blocks import BlockStore  # noqa: E402
from indexer.embed import embed_blocks, pad_batch  # noqa: E402
from indexer.lexical import LexicalIndex, reciprocal_rank_fusion  # noqa: E402
from indexer.shards import ShardedIndex  # noqa: E402
from indexer.versions import IndexVersions  # noqa: E402
from trainer.bert import bert_factory  # noqa: E402
from trainer.checkpoint import load_model  # noqa: E402
from trainer.model import REALM, build_realm  # noqa: E402
from trainer.qa import (  # noqa: E402
    QAExample,
    answer_in_text,
    qa_file,  # noqa: E402
    read_qa,
)
from trainer.qa_system import QASystem, answer_questions  # noqa: E402
from trainer.run import Run  # noqa: E402

MAX_K = 20
REPORT_KS = (1, 5, 20)
HEADER = ("# Results\n\nRetrieval and Open-QA on real data, newest first. Written by "
          "`python -m bench.retrieval_compare` (the whole recipe: `bash scripts/squad_open.sh`); "
          "do not edit by hand.\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "squad_open.yaml"))
    p.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"), help="markdown file to prepend to")
    p.add_argument("--plot", help="PNG of recall@k (default: docs/<config name>_recall_at_k.png)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    a = p.parse_args(argv)
    a.plot = a.plot or str(ROOT / "docs" / f"{Path(a.config).stem}_recall_at_k.png")
    return a


# ---- retrievers: each returns block ids [questions, k], best first --------------------------------


def bm25_ranking(store: BlockStore, questions: list[str], k: int) -> np.ndarray:
    """The store's own BM25 index (indexer.lexical, what retrieval.mode=bm25 serves): block ids [Q, k]."""
    return LexicalIndex(store.bm25_dir).search(questions, k)[1]


def off_the_shelf(cfg: Config, vocab_size: int) -> REALM:
    """`model.init` as sentence-transformers uses it: every layer, mean-pooled, no projection (untrained)."""
    m = cfg.model
    make_bert = bert_factory(m.init, vocab_size, m.hidden_size, m.num_heads, m.intermediate_size)
    model = build_realm(make_bert, 0, 0, pooling="mean")
    for tower in (model.retriever.query_tower, model.retriever.doc_tower):
        tower.proj = torch.nn.Identity()
    return model


def doc_embeddings(run: Run, model, meta: dict) -> np.ndarray:
    """The corpus under this model's doc encoder: an index version it published, else embedded now (not saved)."""
    doc_encoder_id = meta.get("doc_encoder_id")
    version = (run.versions.find(store_version=run.store.version, doc_encoder_id=doc_encoder_id)
               if doc_encoder_id else None)
    if version is not None and version.rows == len(run.store):
        return IndexVersions.load_rows(version)
    return embed_blocks(model.retriever.doc_tower, run.store, batch_size=64, device=run.device,
                        progress=sys.stderr.isatty(), pad_id=run.vocab.pad)


@torch.no_grad()
def dense_ranking(system: QASystem, questions: list[str], k: int, batch_size: int) -> np.ndarray:
    out = []
    for i in range(0, len(questions), batch_size):
        q_ids, q_mask = pad_batch(system.encode_questions(questions[i:i + batch_size]), system.run.vocab.pad)
        out.append(system.relevance(q_ids, q_mask, k)[1])
    return np.concatenate(out)


# ---- metrics ---------------------------------------------------------------------------------------


def recall_curve(ranking: np.ndarray, gold: list[range]) -> np.ndarray:
    """recall@k for k = 1..K: the share of questions with a gold block among their top k."""
    first = np.array([next((r for r, b in enumerate(row) if int(b) in g), MAX_K) for row, g in zip(ranking, gold)])
    return np.array([(first < k).mean() for k in range(1, ranking.shape[1] + 1)])


def answer_recall(ranking: np.ndarray, examples: list[QAExample], store: BlockStore, k: int) -> float:
    return float(np.mean([any(answer_in_text(store.text(int(b)), ex.answers, ex.is_regex) for b in row[:k] if b >= 0)
                          for row, ex in zip(ranking, examples)]))


def gold_blocks(examples: list[QAExample], store: BlockStore, path: str) -> list[range]:
    gold = []
    for i, ex in enumerate(examples, 1):
        blocks = store.doc_blocks(ex.gold_id) if ex.gold_id is not None else range(0)
        if len(blocks) == 0:
            raise InputError(f"{path}: question {i}: gold_id {ex.gold_id!r} is not a document of the corpus")
        gold.append(blocks)
    return gold


# ---- the run's models ----------------------------------------------------------------------------


def run_models(run_dir: Path) -> list[Path]:
    """models/ict, models/realm, then every fine-tuned Open-QA model, by name."""
    models = run_dir / "models"
    found = [models / n for n in ("ict", "realm") if (models / n / "realm.json").is_file()]
    return found + sorted(p.parent for p in models.glob("*/realm.json") if p.parent not in found)


def describe(meta: dict) -> str:
    if meta.get("kind") == "openqa_model":
        return f"{meta.get('init', '?')} + fine-tuning, {meta['step']} steps"
    return "ICT" if meta.get("stage") == "ict" else f"ICT + REALM, {meta['step']} steps"


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    run = Run.open(cfg)
    if cfg.threads > 0:
        import faiss

        faiss.omp_set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    qa_path = qa_file(cfg, "qa_eval")
    examples = read_qa(qa_path)[:cfg.data.max_eval_examples]
    questions = [ex.question for ex in examples]
    gold = gold_blocks(examples, run.store, qa_path)
    k = min(MAX_K, len(run.store))

    rows, curves = [], {}

    def add(name: str, training: str, ranking: np.ndarray, em: float | None = None) -> None:
        curve = recall_curve(ranking, gold)
        row = {"retriever": name, "training": training}
        row.update({f"recall@{r}": float(curve[r - 1]) for r in REPORT_KS if r <= k})
        row["answer recall@5"] = answer_recall(ranking, examples, run.store, 5)
        if em is not None:
            row[f"EM (top {cfg.finetune.k})"] = em
        rows.append(row)
        curves[name] = curve
        print(markdown_table([row]).splitlines()[-1], flush=True)

    bm25 = bm25_ranking(run.store, questions, k)
    add("BM25 (bm25s)", "none", bm25)
    model = off_the_shelf(cfg, run.vocab.size).to(run.device).eval()
    emb = doc_embeddings(run, model, {})
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # cosine: the query's norm does not change its ranking
    system = QASystem(run, model, {}, index=ShardedIndex(emb, dead=run.store.dead))
    add(f"{cfg.model.init} off the shelf", "none (mean-pooled, cosine)",
        dense_ranking(system, questions, k, cfg.eval.batch_size))
    for model_dir in run_models(run.dir):
        model, meta = load_model(model_dir)
        model.to(run.device).eval()
        system = QASystem(run, model, meta, index=ShardedIndex(doc_embeddings(run, model, meta), dead=run.store.dead))
        em = None
        if meta["kind"] == "openqa_model":
            records = answer_questions(system, examples, cfg.finetune.k, cfg.finetune.max_answer_len,
                                       cfg.eval.batch_size)
            em = float(np.mean([r["exact_match"] for r in records]))
        dense = dense_ranking(system, questions, k, cfg.eval.batch_size)
        add(f"models/{model_dir.name}", describe(meta), dense, em)
        if meta["kind"] == "openqa_model":  # the hybrid a deployment could run: BM25 and the fine-tuned retriever
            add(f"BM25 + models/{model_dir.name} (RRF)", "reciprocal rank fusion of the two top-20 lists",
                reciprocal_rank_fusion([bm25, dense], k))

    config = {"config": a.config, "run_dir": cfg.run_dir, "blocks": len(run.store),
              "questions": f"{len(examples)} ({qa_path})", "model.init": cfg.model.init,
              "retriever_layers": cfg.model.retriever_layers, "ict.steps": cfg.ict.steps,
              "pretrain.steps": cfg.pretrain.steps, "finetune.steps": cfg.finetune.steps, "threads": cfg.threads}
    notes = [f"recall@k: a block of the gold paragraph among the top k blocks (chance at k={k}: about "
             f"{np.mean([len(g) for g in gold]) * k / len(run.store):.3f}); plot: {Path(a.plot).name}",
             "answer recall@5: an answer string in one of the top 5 blocks (normalized, whole tokens)",
             f"EM: exact match of the answer the model reads from its top {cfg.finetune.k} blocks",
             "BM25: bm25s (Lucene, k1=1.5, b=0.75), English stop words, no stemming, title + text of each block",
             "RRF: reciprocal rank fusion, score = sum of 1 / (60 + rank) over BM25's and the model's top 20",
             f"{cfg.model.init} off the shelf: every layer, mean-pooled, cosine; the run's models: "
             f"first {cfg.model.retriever_layers or 'all'} layers, {cfg.model.retrieval_dim}-d inner product"]
    command = "python -m bench.retrieval_compare " + " ".join(shlex.quote(x) for x in argv or sys.argv[1:])
    write_results(f"Retrieval comparison, {Path(a.config).stem}", config, rows, a.results, run.device, notes,
                  HEADER, command)
    # after the results: their commit line would otherwise call a tracked plot's new bytes "+dirty"
    plot(curves, a.plot, f"{Path(cfg.data.corpus).parent.name or 'corpus'}: {len(examples)} questions, "
                         f"{len(run.store)} blocks")
    print(f"\n{markdown_table(rows)}\n\nwrote {a.results} and {a.plot}")
    return rows


def plot(curves: dict[str, np.ndarray], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, len(next(iter(curves.values()))) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(ks, curve, marker="o", markersize=3, label=name)
    ax.set(xlabel="k (retrieved blocks)", ylabel="gold-paragraph recall@k", title=title, xlim=(1, ks[-1]), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
