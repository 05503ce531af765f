"""Retrieval side by side on an Open-QA corpus: every retriever on the same blocks and question sets in one run.

Question sets: the config's `data.qa_eval`, or those named by `--questions NAME=PATH` (repeatable; they replace
data.qa_eval), each cut to `data.max_eval_examples`. Every set gets its own rows in the one table (`questions`).
Rows per set: BM25 (the store's own index, indexer.lexical: what retrieval.mode=bm25 serves); `model.init` off
the shelf (all its layers, mean-pooled, cosine: no training); each model of the run, models/ict, models/realm
and the fine-tuned Open-QA models (models/qa, models/qa_ict, ...), searched by its own index (dense); and for
each fine-tuned model its `hybrid` row: the candidates retrieval.mode=hybrid serves (trainer.index_client.
CandidateSource: `retrieval.fusion` of the model's and BM25's rankings, each `retrieval.fusion_depth` deep).
  answer recall@k  an answer string is in one of the top k blocks, title or text (what the reader reads:
                   [CLS] title [SEP] text; trainer.qa.answer_in_text: SQuAD normalization, whole tokens;
                   DPR's top-k accuracy over title + passage), k = 1, 5, 20, 100 (capped at the live blocks)
  recall@k         a block of the question's gold paragraph is among the top k blocks, k = 1, 5, 20: only for
                   a set whose every question has `gold_id` (SQuAD-open); empty cells for the others
  EM               exact match of the fine-tuned models, reading their top finetune.k blocks: the dense row
                   from the model's index, the hybrid row from the hybrid candidates
Prepends a section (machine, commit, date, config, table) to docs/RESULTS.md and plots answer recall@k,
k = 1..100, one line per retriever and one panel per question set (--plot).

    python -m bench.retrieval_compare --config configs/squad_open.yaml [dotted.key=value ...]
    python -m bench.retrieval_compare --config CONFIG --questions nq_dev=../shared/data/wiki_vital/nq_dev.jsonl \
        --questions webquestions_test=../shared/data/wiki_vital/webquestions_test.jsonl [dotted.key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
from dataclasses import dataclass
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
from indexer.lexical import LexicalIndex  # noqa: E402
from indexer.shards import ShardedIndex  # noqa: E402
from indexer.versions import IndexVersions  # noqa: E402
from trainer.bert import bert_factory  # noqa: E402
from trainer.checkpoint import load_model  # noqa: E402
from trainer.index_client import CandidateSource  # noqa: E402
from trainer.model import REALM, build_realm  # noqa: E402
from trainer.qa import QAExample, answer_in_text, qa_file, read_qa  # noqa: E402
from trainer.qa_system import QASystem, answer_questions  # noqa: E402
from trainer.run import Run  # noqa: E402

MAX_K = 100                 # ranking depth (capped at the live blocks)
ANSWER_KS = (1, 5, 20, 100)
GOLD_KS = (1, 5, 20)
HEADER = ("# Results\n\nRetrieval and Open-QA on real data, newest first. Written by "
          "`python -m bench.retrieval_compare` (the whole recipe: `bash scripts/squad_open.sh`); "
          "do not edit by hand.\n")


def question_spec(s: str) -> tuple[str, str]:
    """argparse type of --questions: NAME=PATH."""
    name, sep, path = s.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {s!r}")
    return name.strip(), path.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "squad_open.yaml"))
    p.add_argument("--questions", action="append", type=question_spec, default=[], metavar="NAME=PATH",
                   help="a question set (QA JSONL: question, answers [, gold_id]); repeatable; "
                        "replaces data.qa_eval")
    p.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"), help="markdown file to prepend to")
    p.add_argument("--plot", help="PNG of answer recall@k (default: docs/<config name>_recall_at_k.png)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    a = p.parse_intermixed_args(argv)  # overrides before, between or after the flags
    names = [n for n, _ in a.questions]
    if len(set(names)) < len(names):
        p.error(f"--questions: a name given twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    a.plot = a.plot or str(ROOT / "docs" / f"{Path(a.config).stem}_recall_at_k.png")
    return a


# ---- question sets -------------------------------------------------------------------------------


@dataclass
class QuestionSet:
    name: str
    path: str
    examples: list[QAExample]
    gold: list[range] | None  # each question's gold blocks, where every question has a gold_id

    @property
    def questions(self) -> list[str]:
        return [ex.question for ex in self.examples]


def question_sets(cfg: Config, specs: list[tuple[str, str]], store: BlockStore) -> list[QuestionSet]:
    """--questions' sets, else data.qa_eval (named by its file), each cut to data.max_eval_examples."""
    if not specs:
        path = qa_file(cfg, "qa_eval")
        specs = [(Path(path).stem, path)]
    sets = []
    for name, path in specs:
        examples = read_qa(path)[:cfg.data.max_eval_examples]
        has_gold = all(ex.gold_id is not None for ex in examples)
        sets.append(QuestionSet(name, path, examples, gold_blocks(examples, store, path) if has_gold else None))
    return sets


def gold_blocks(examples: list[QAExample], store: BlockStore, path: str) -> list[range]:
    gold = []
    for i, ex in enumerate(examples, 1):
        blocks = store.doc_blocks(ex.gold_id)
        if len(blocks) == 0:
            raise InputError(f"{path}: question {i}: gold_id {ex.gold_id!r} is not a document of the corpus")
        gold.append(blocks)
    return gold


# ---- retrievers: each returns block ids [questions, depth], best first, -1 = none --------------------


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


def with_mode(system: QASystem, mode: str) -> QASystem:
    """The same model and index with the candidates of `mode` (what retrieval.mode=<mode> serves), whatever
    retrieval.mode the config sets."""
    out = copy.copy(system)  # shares the model, the index and the doc embeddings
    out.source = CandidateSource.for_run(system.run, system.index, mode)
    return out


def fusion_note(r) -> str:
    """How retrieval.mode=hybrid fuses, in words (r: the config's retrieval section)."""
    w = f"BM25 weight {r.bm25_weight:g}, the model's {1 - r.bm25_weight:g}"
    if r.fusion == "rrf":
        return f"reciprocal rank fusion, score = sum of w / ({r.rrf_k:g} + rank) ({w})"
    return f"convex fusion of min-max normalized scores ({w})"


@torch.no_grad()
def scored_ranking(system: QASystem, questions: list[str], k: int, batch_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The top k blocks of each question as system.source ranks them (dense, bm25 or hybrid): the model's
    scores [N, k] float32 (-inf past the candidates) and block ids [N, k]."""
    scores, ids = [], []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        q_ids, q_mask = pad_batch(system.encode_questions(chunk), system.run.vocab.pad)
        s, z = system.relevance(q_ids, q_mask, k, questions=chunk)
        scores.append(s.float().cpu().numpy())
        ids.append(z)
    if not ids:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(ids)


def ranking(system: QASystem, questions: list[str], k: int, batch_size: int) -> np.ndarray:
    """The top k block ids of each question as system.source ranks them (dense, bm25 or hybrid)."""
    return scored_ranking(system, questions, k, batch_size)[1]


def exact_match_rate(system: QASystem, qs: QuestionSet, cfg: Config) -> float:
    records = answer_questions(system, qs.examples, cfg.finetune.k, cfg.finetune.max_answer_len, cfg.eval.batch_size)
    return float(np.mean([r["exact_match"] for r in records]))


# ---- metrics ---------------------------------------------------------------------------------------


def gold_recall_curve(ids: np.ndarray, gold: list[range]) -> np.ndarray:
    """recall@k for k = 1..depth: the share of questions with a gold block among their top k."""
    depth = ids.shape[1]
    first = np.array([next((r for r, b in enumerate(row) if int(b) in g), depth) for row, g in zip(ids, gold)])
    return np.array([(first < k).mean() for k in range(1, depth + 1)])


class AnswerHits:
    """Whether a block holds an answer string of a question (trainer.qa.answer_in_text), memoized: the
    retrievers of one set share most of their blocks."""

    def __init__(self, store: BlockStore, examples: list[QAExample]):
        self.store, self.examples = store, examples
        self._text: dict[int, str] = {}
        self._hit: dict[tuple[int, int], bool] = {}

    def __call__(self, q: int, block: int) -> bool:
        key = (q, block)
        if key not in self._hit:
            if block not in self._text:  # the title too: the reader reads it, and DPR's top-k accuracy counts it
                self._text[block] = f"{self.store.title(block)} {self.store.text(block)}"
            ex = self.examples[q]
            self._hit[key] = answer_in_text(self._text[block], ex.answers, ex.is_regex)
        return self._hit[key]

    def curve(self, ids: np.ndarray) -> np.ndarray:
        """answer recall@k for k = 1..depth: the share of questions with an answer string in their top k blocks."""
        depth = ids.shape[1]
        first = np.array([next((r for r, b in enumerate(row) if b >= 0 and self(q, int(b))), depth)
                          for q, row in enumerate(ids)])
        return np.array([(first < k).mean() for k in range(1, depth + 1)])


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
    sets = question_sets(cfg, a.questions, run.store)
    depth = min(MAX_K, run.store.num_live)
    any_gold = any(qs.gold is not None for qs in sets)
    em_col = f"EM (top {cfg.finetune.k})"
    hits = {qs.name: AnswerHits(run.store, qs.examples) for qs in sets}
    rows: dict[str, list[dict]] = {qs.name: [] for qs in sets}
    curves: dict[str, dict[str, np.ndarray]] = {qs.name: {} for qs in sets}

    def add(qs: QuestionSet, name: str, training: str, ids: np.ndarray, em: float | None = None) -> None:
        row = {"retriever": name, "questions": qs.name, "training": training}
        if any_gold:  # every row has the columns, in one order; a set without gold_id leaves them empty
            gold = gold_recall_curve(ids, qs.gold) if qs.gold is not None else None
            row.update({f"recall@{r}": float(gold[r - 1]) if gold is not None else "" for r in GOLD_KS
                        if r <= depth})
        curve = hits[qs.name].curve(ids)
        row.update({f"answer recall@{r}": float(curve[min(r, depth) - 1]) for r in ANSWER_KS})
        if em is not None:
            row[em_col] = em
        rows[qs.name].append(row)
        curves[qs.name][name] = curve
        print(markdown_table([row]).splitlines()[-1], flush=True)

    bm25 = LexicalIndex(run.store.bm25_dir)
    for qs in sets:
        add(qs, "BM25 (bm25s)", "none", bm25.search(qs.questions, depth)[1])
    model = off_the_shelf(cfg, run.vocab.size).to(run.device).eval()
    emb = doc_embeddings(run, model, {})
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # cosine: the query's norm does not change its ranking
    system = with_mode(QASystem(run, model, {}, index=ShardedIndex(emb, dead=run.store.dead)), "dense")
    for qs in sets:
        add(qs, f"{cfg.model.init} off the shelf", "none (mean-pooled, cosine)",
            ranking(system, qs.questions, depth, cfg.eval.batch_size))
    for model_dir in run_models(run.dir):
        model, meta = load_model(model_dir)
        model.to(run.device).eval()
        base = QASystem(run, model, meta, index=ShardedIndex(doc_embeddings(run, model, meta), dead=run.store.dead))
        fine_tuned = meta["kind"] == "openqa_model"
        modes = ("dense", "hybrid") if fine_tuned else ("dense",)  # hybrid: what a deployment of it can serve
        for mode in modes:
            system = with_mode(base, mode)
            name = f"models/{model_dir.name}" + (" hybrid" if mode == "hybrid" else "")
            training = describe(meta) + (" (retrieval.mode=hybrid)" if mode == "hybrid" else "")
            for qs in sets:
                em = exact_match_rate(system, qs, cfg) if fine_tuned else None
                add(qs, name, training, ranking(system, qs.questions, depth, cfg.eval.batch_size), em)

    table = [row for qs in sets for row in rows[qs.name]]
    config = {"config": a.config, "run_dir": cfg.run_dir, "blocks": f"{run.store.num_live} live",
              "questions": "; ".join(f"{qs.name}: {len(qs.examples)} ({qs.path})" for qs in sets),
              "model.init": cfg.model.init, "retriever_layers": cfg.model.retriever_layers, "ict.steps": cfg.ict.steps,
              "pretrain.steps": cfg.pretrain.steps, "finetune.steps": cfg.finetune.steps,
              "retrieval.fusion": cfg.retrieval.fusion, "retrieval.bm25_weight": cfg.retrieval.bm25_weight,
              "retrieval.fusion_depth": cfg.retrieval.fusion_depth, "retrieval.rrf_k": cfg.retrieval.rrf_k,
              "threads": cfg.threads}
    notes = [f"answer recall@k: an answer string in the title or text of one of the top k blocks (SQuAD "
             f"normalization, whole tokens: DPR's top-k accuracy); ranked {depth} deep"
             + (f" (all {run.store.num_live} live blocks: answer recall@100 is recall@{depth})" if depth < MAX_K
                else "") + f"; plot: {Path(a.plot).name}"]
    for qs in sets:
        if qs.gold is not None:
            k = min(20, depth)
            chance = np.mean([len(g) for g in qs.gold]) * k / run.store.num_live
            notes.append(f"recall@k ({qs.name}): a block of the gold paragraph among the top k blocks "
                         f"(chance at k={k}: about {chance:.3f})")
    if any_gold and not all(qs.gold is not None for qs in sets):
        notes.append("recall@k is empty for a set whose questions carry no gold_id")
    notes += [f"EM: exact match of the answer a fine-tuned model reads from its top {cfg.finetune.k} blocks: from its "
              "own index (dense row) or from the hybrid candidates (hybrid row)",
              "BM25: the block store's index (bm25s: Lucene, k1=1.5, b=0.75), English stop words, no stemming, "
              "title + text of each block (retrieval.mode=bm25)",
              f"hybrid: retrieval.mode=hybrid as served: {fusion_note(cfg.retrieval)} over the model's and BM25's "
              f"top {cfg.retrieval.fusion_depth}",
              f"{cfg.model.init} off the shelf: every layer, mean-pooled, cosine; the run's models: "
              f"first {cfg.model.retriever_layers or 'all'} layers, {cfg.model.retrieval_dim}-d inner product"]
    command = "python -m bench.retrieval_compare " + " ".join(shlex.quote(x) for x in argv or sys.argv[1:])
    write_results(f"Retrieval comparison, {Path(a.config).stem}", config, table, a.results, run.device, notes,
                  HEADER, command)
    # after the results: their commit line would otherwise call a tracked plot's new bytes "+dirty"
    plot(curves, {qs.name: len(qs.examples) for qs in sets}, a.plot,
         f"{Path(cfg.data.corpus).parent.name or 'corpus'}: {run.store.num_live} blocks")
    print(f"\n{markdown_table(table)}\n\nwrote {a.results} and {a.plot}")
    return table


def plot(curves: dict[str, dict[str, np.ndarray]], sizes: dict[str, int], path: str, title: str) -> None:
    """Answer recall@k against k (log scale), one line per retriever, one panel per question set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.8), sharey=True, squeeze=False)
    for ax, (name, per_retriever) in zip(axes[0], curves.items()):
        for retriever, curve in per_retriever.items():
            ks = np.arange(1, len(curve) + 1)
            ax.plot(ks, curve, label=retriever, linestyle="--" if retriever.endswith(" hybrid") else "-")
        depth = max(len(c) for c in per_retriever.values())
        ax.set(xscale="log", xlabel="k (retrieved blocks)", title=f"{name}: {sizes[name]} questions",
               xlim=(1, max(depth, 2)), ylim=(0, 1))
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=7)
    axes[0][0].set_ylabel("answer recall@k")
    fig.suptitle(title)
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
