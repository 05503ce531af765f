"""Corpus edits without retraining, measured on a fine-tuned run of the synthetic-knowledge generator.

On a copy of RUN (never RUN itself), with the QA model fixed, one `update-corpus` per step, as in the
README: add new people, change one fact in some documents, delete others, then edit 1% of the corpus
and time that against `reindex` of the whole edited corpus (same encoders), checking that both give
the same top-k. Exact match comes from `evaluate task=openqa` on question files written here.

    python bench/corpus_edits.py --run-dir runs/hard2000/run     # a run that went through finetune

RUN's corpus must come from the generator (`prepare` with data.corpus empty, or write_synthetic's files given
as --corpus and --qa-eval): the edits read its people's facts back from their documents (read_facts).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, add_common_args, apply_common_args, print_table, write_results  # noqa: E402
from cluster.config import load_config  # noqa: E402
from indexer.synthetic import CITIES, QUESTIONS, RELATIONS, new_people, read_facts  # noqa: E402
from trainer.corpus_edits import reindex, update_corpus  # noqa: E402
from trainer.evaluate import evaluate_openqa  # noqa: E402

PIPELINE = ("evaluate", "update-corpus", "reindex", "query")  # the overrides go to each that reads them


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Bench:
    def __init__(self, run: Path, work: Path, config: str, overrides: list[str]):
        self.run, self.work, self.config, self.overrides = run, work, config, overrides
        self.n_files = 0

    def cfg(self, command: str, *extra: str):
        return load_config(self.config, [f"run_dir={self.run}", *self.overrides, *extra], command, PIPELINE)

    def file(self, stem: str, rows: list[dict]) -> Path:
        self.n_files += 1
        return write_jsonl(self.work / f"{self.n_files:02d}_{stem}.jsonl", rows)

    def answers(self, stem: str, qa: list[dict]) -> tuple[dict, list[dict]]:
        """evaluate task=openqa on these questions: its metrics and predictions.jsonl."""
        m = evaluate_openqa(self.cfg("evaluate", "task=openqa", f"data.qa_eval={self.file(stem, qa)}",
                                     f"data.max_eval_examples={len(qa)}"))
        preds = [json.loads(line) for line in open(self.run / "predictions.jsonl")]
        assert m["n"] == len(qa) == len(preds)
        return m, preds

    def update(self, stem: str, changes: list[dict]) -> dict:
        t0 = time.perf_counter()
        out = update_corpus(self.cfg("update-corpus", f"changes={self.file(stem, changes)}"))
        out["wall"] = time.perf_counter() - t0
        return out

    def top_k(self, questions: list[str], k: int) -> list[list[tuple]]:
        """(doc id, block text, score) best first per question, from the QA system `query` opens."""
        import torch

        from indexer.embed import pad_batch
        from trainer.qa_system import load_qa_system

        system = load_qa_system(self.cfg("query", f"finetune.k={k}"), "auto")
        store, out = system.run.store, []
        with torch.no_grad():
            for i in range(0, len(questions), 64):
                ids, mask = pad_batch(system.encode_questions(questions[i:i + 64]), system.run.vocab.pad)
                q = system.model.retriever.embed_queries(ids.to(system.run.device), mask.to(system.run.device))
                scores, rows = system.index.search(q.float().cpu().numpy(), k)
                out += [[(store.doc_id(int(b)), store.text(int(b)), float(s)) for b, s in zip(row, srow) if b >= 0]
                        for row, srow in zip(rows, scores)]
        return out


def edit_fact(doc: dict, facts: dict, rel: str, rng: random.Random) -> tuple[dict, str, str] | None:
    """The document with `rel` changed to a value unlike its others (None if the old value is not unique)."""
    old = facts[rel]
    if doc["text"].count(old) != 1:
        return None
    taken = set(facts.values())
    if rel.endswith("city"):
        new = rng.choice([c.capitalize() for c in CITIES if c.capitalize() not in taken])
    else:
        new = str(rng.choice([y for y in range(1700, 2000) if str(y) not in taken]))
    return {**doc, "text": doc["text"].replace(old, new)}, old, new


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--run-dir", required=True, help="a fine-tuned run of the generator (copied, not changed)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="the config RUN was made with")
    p.add_argument("--work", help="default: a temp dir, removed afterwards")
    p.add_argument("--add", type=int, default=200, help="new people to add")
    p.add_argument("--edit", type=int, default=100, help="documents whose birthplace changes")
    p.add_argument("--delete", type=int, default=100, help="documents to delete")
    p.add_argument("--cost-fraction", type=float, default=0.01, help="share of the corpus edited for the timing")
    p.add_argument("--max-questions", type=int, default=800, help="questions per EM figure (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", help="RUN's corpus JSONL (default: RUN/data/corpus.jsonl, from prepare)")
    p.add_argument("--qa-eval", help="held-out questions with gold_id (default: RUN/data/qa_eval.jsonl)")
    p.add_argument("overrides", nargs="*", help="config overrides RUN was made with (its lengths, e.g.)")
    a = p.parse_args(argv)
    apply_common_args(a)
    if a.threads:
        a.overrides.append(f"threads={a.threads}")
    src = Path(a.run_dir).resolve()
    work = Path(a.work or tempfile.mkdtemp(prefix="corpus-edits-"))
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("checkpoints", "published"))
    b = Bench(run, work, a.config, a.overrides)
    try:
        rows = measure(b, a)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table("Corpus edits", rows)
    write_results("Corpus edits without retraining", {
        "run": str(src), "config": Path(a.config).name, "add": a.add, "edit": a.edit, "delete": a.delete,
        "cost_fraction": a.cost_fraction, "seed": a.seed, "overrides": " ".join(a.overrides) or "-"}, rows, a.results,
        notes=["one update-corpus per row, on a copy of the run; the QA model is never trained here",
               "EM rows: `evaluate task=openqa` on the questions named; 'absent' = people not in the corpus, the "
               "level a model with no retrieved evidence reaches",
               "seconds: the update_corpus / reindex call in this process (model and store loading included)"])
    return rows


def measure(b: Bench, a) -> list[dict]:
    rng = random.Random(a.seed)
    cfg = b.cfg("evaluate", "task=openqa")
    corpus = {d["id"]: d for d in map(json.loads, open(a.corpus or b.run / "data" / "corpus.jsonl"))}
    facts = {i: read_facts(d) for i, d in corpus.items()}
    relations = "confusable" if all(len(f) == len(RELATIONS["confusable"]) for f in facts.values()) else "basic"
    held_qa = [json.loads(line) for line in open(a.qa_eval or b.run / "data" / "qa_eval.jsonl")]
    held_docs = sorted({q["gold_id"] for q in held_qa})
    rng.shuffle(held_docs)
    cap = a.max_questions
    rows = []

    def em_row(what: str, m: dict, extra: dict | None = None) -> dict:
        row = {"step": what, "n": m["n"], "exact_match": m["exact_match"],
               "answer_in_top_k": m["retrieval_recall_at_k"], "top_share_is_gold": m["top_share_is_gold"],
               **(extra or {})}
        rows.append(row)
        return row

    # people present at training time (the held-out ones: never in a pre-training or fine-tuning example)
    present = em_row("present at training time (held-out people)", b.answers("present", held_qa[:cap])[0])

    # add: new people, absent first (the no-evidence level), then added
    names = {d["title"] for d in corpus.values()}
    new = new_people(a.add, seed=10_000 + a.seed, relations=relations, exclude_names=names)
    new_qa = new["qa"][:cap]
    absent = em_row(f"{a.add} new people, absent from the corpus", b.answers("absent", new_qa)[0])
    up = b.update("add", new["corpus"])
    corpus.update({d["id"]: d for d in new["corpus"]})
    added = em_row(f"{a.add} new people, after update-corpus", b.answers("added", new_qa)[0],
                   {"seconds": up["seconds"], "blocks_embedded": up["blocks_embedded"]})
    added["ratio_to_present"] = added["exact_match"] / present["exact_match"] if present["exact_match"] else None

    # edit: one fact (the birthplace, or the hometown in the basic generator) of documents of held-out people
    rel = "birth_city" if relations == "confusable" else "city"
    edits, edit_qa, olds = [], [], []
    for doc_id in held_docs:
        if len(edits) == a.edit:
            break
        e = edit_fact(corpus[doc_id], facts[doc_id], rel, rng)
        if e:
            edits.append(e[0])
            olds.append(e[1])
            edit_qa.append({"question": QUESTIONS[rel][0].format(n=corpus[doc_id]["title"]), "answers": [e[2]],
                            "gold_id": doc_id})
    em_row(f"{len(edits)} edited facts, before: answers = old value",
                    b.answers("edit_before", [{**q, "answers": [o]} for q, o in zip(edit_qa, olds)])[0])
    up = b.update("edit", edits)
    corpus.update({d["id"]: d for d in edits})
    m, preds = b.answers("edit_after", edit_qa)
    follows_old = sum(p["prediction"].strip().lower() == o.lower() for p, o in zip(preds, olds)) / len(preds)
    em_row(f"{len(edits)} edited facts, after: answers = new value", m,
           {"old_value_share": follows_old, "seconds": up["seconds"], "blocks_embedded": up["blocks_embedded"]})

    # delete: other held-out people's documents
    edited = {d["id"] for d in edits}
    gone = [d for d in held_docs if d not in edited][:a.delete]
    gone_qa = [q for q in held_qa if q["gold_id"] in set(gone)][:cap]
    em_row(f"{len(gone)} documents, before delete", b.answers("delete_before", gone_qa)[0])
    up = b.update("delete", [{"id": d, "delete": True} for d in gone])
    for d in gone:
        del corpus[d]
    em_row(f"{len(gone)} documents, after delete", b.answers("delete_after", gone_qa)[0],
           {"absent_level": absent["exact_match"], "seconds": up["seconds"]})

    # cost: edit a fact in cost_fraction of the documents, vs re-embedding the whole edited corpus
    touched = edited | set(gone) | {d["id"] for d in new["corpus"]}
    pool = [d for d in corpus if d not in touched]
    rng.shuffle(pool)
    n_cost = max(1, round(a.cost_fraction * len(corpus)))
    small = []
    for doc_id in pool:
        if len(small) == n_cost:
            break
        e = edit_fact(corpus[doc_id], facts[doc_id], "year", rng)
        if e:
            small.append(e[0])
    up = b.update("one_percent", small)
    corpus.update({d["id"]: d for d in small})
    probe = [q["question"] for q in held_qa[:cap]] + [q["question"] for q in new_qa]
    k = cfg.eval.k
    edited_topk = b.top_k(probe, k)
    path = b.file("edited_corpus", list(corpus.values()))
    t0 = time.perf_counter()
    full = reindex(b.cfg("reindex", f"data.corpus={path}"))
    full["wall"] = time.perf_counter() - t0
    rebuilt_topk = b.top_k(probe, k)
    same = sum([(d, t) for d, t, _ in x] == [(d, t) for d, t, _ in y] for x, y in zip(edited_topk, rebuilt_topk))
    score_diff = max(abs(s - r) for x, y in zip(edited_topk, rebuilt_topk) for (_, _, s), (_, _, r) in zip(x, y))
    rows.append({"step": f"edit {len(small)} documents ({len(small) / len(corpus):.1%} of {len(corpus)})",
                 "seconds": up["seconds"], "blocks_embedded": up["blocks_embedded"],
                 "ratio_to_reindex": up["seconds"] / full["seconds"]})
    rows.append({"step": f"reindex all {len(corpus)} documents (same encoders)", "seconds": full["seconds"],
                 "blocks_embedded": full["blocks_embedded"],
                 "same_top_k": f"{same}/{len(probe)} questions (top-{k}; max score difference {score_diff:.2g})"})
    return rows


if __name__ == "__main__":
    main()
