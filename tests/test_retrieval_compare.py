"""bench/retrieval_compare.py on real search questions without gold paragraphs: a slice of the shared
wiki_vital data (60 Wikipedia leads; the NQ and WebQuestions questions whose answer string occurs in them),
a random tiny BERT, ICT and fine-tuning from ICT of a few steps, two question sets in one run."""
import json

import numpy as np
import pytest

import bench.retrieval_compare as rc
from tests.conftest import ROOT, TINY_MODEL, write_jsonl
from tests.test_bench_smoke import table
from trainer.qa import answer_in_text

DATA = ROOT.parent / "shared" / "data" / "wiki_vital"
DOCS = 60
SETS = ("nq_dev", "webquestions_test")
ANSWER_COLS = [f"answer recall@{k}" for k in (1, 5, 20, 100)]

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (the shared data) is not here")


def wiki_slice(out):
    """The first DOCS leads and, per question file, the questions whose answer string is in one of them
    (none carries a gold_id)."""
    out.mkdir()
    with open(DATA / "corpus.jsonl") as f:
        docs = [next(f).strip() for _ in range(DOCS)]
    texts = [json.loads(d)["text"] for d in docs]
    paths = {"corpus": write_jsonl(out / "corpus.jsonl", docs)}
    for split in ("nq_train", *SETS):
        rows = [json.loads(line) for line in open(DATA / f"{split}.jsonl")]
        kept = [r for r in rows if any(answer_in_text(t, r["answers"]) for t in texts)]
        assert kept and all("gold_id" not in r for r in kept), split
        paths[split] = write_jsonl(out / f"{split}.jsonl", kept)
    return paths


def test_compare_two_question_sets_without_gold(tmp_path):
    from cluster.config import load_config
    from trainer.finetune import finetune
    from trainer.ict import ict
    from trainer.prepare import prepare
    from trainer.qa_system import answer_questions, load_qa_system

    data = wiki_slice(tmp_path / "data")
    config = str(ROOT / "configs" / "tiny.yaml")
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.corpus={data['corpus']}", f"data.qa_train={data['nq_train']}",
                 f"data.qa_eval={data['nq_dev']}", "masking.ner=regex", "cluster.backend=local", "retrieval.k=3",
                 "eval.k=3", "ict.steps=2", "ict.batch_size=8", "finetune.steps=2", "finetune.k=3",
                 "finetune.batch_size=4", "finetune.init=ict", "finetune.name=qa_ict", "data.max_eval_examples=30",
                 *TINY_MODEL, "threads=1"]
    cfg = load_config(config, overrides)
    prepare(cfg)
    ict(cfg)
    finetune(cfg)

    results, plot = tmp_path / "RESULTS.md", tmp_path / "recall.png"
    rows = rc.main(["--config", config, "--results", str(results), "--plot", str(plot),
                    *(f"--questions={name}={data[name]}" for name in SETS), *overrides])

    text = results.read_text()
    assert text.startswith(rc.HEADER) and "## Retrieval comparison, tiny" in text
    written = table(text, "retriever")
    assert len(written) == len(rows)
    names = ["BM25 (bm25s)", "random off the shelf", "models/ict", "models/qa_ict", "models/qa_ict hybrid"]
    for name in SETS:
        assert [r["retriever"] for r in written if r["questions"] == name] == names, name
    assert not any(col.startswith("recall@") for col in written[0])  # no gold_id: no gold-paragraph columns
    for row in written:
        recall = [float(row[c]) for c in ANSWER_COLS]
        assert 0 <= recall[0] <= recall[1] <= recall[2] <= recall[3] <= 1, row
        assert (row["EM (top 3)"] != "") == row["retriever"].startswith("models/qa_ict"), row
        if row["retriever"] == "BM25 (bm25s)":
            assert recall[3] > 0, row  # every question's answer is somewhere in these 60 leads
    assert plot.read_bytes().startswith(b"\x89PNG")

    # The hybrid and dense rows are what retrieval.mode=hybrid / dense serve: the served system's top block
    # and its exact match give the rows' answer recall@1 and EM.
    by_name = {(r["questions"], r["retriever"]): r for r in rows}
    for mode, suffix in (("dense", ""), ("hybrid", " hybrid")):
        served = load_qa_system(load_config(config, [*overrides, f"retrieval.mode={mode}"]), "qa_ict")
        for name in SETS:
            examples = rc.read_qa(str(data[name]))[:30]
            records = answer_questions(served, examples, 3, cfg.finetune.max_answer_len, cfg.eval.batch_size)
            row = by_name[(name, "models/qa_ict" + suffix)]
            assert row["EM (top 3)"] == pytest.approx(np.mean([r["exact_match"] for r in records])), (mode, name)
            top1 = np.mean([answer_in_text(served.run.store.text(r["top_k"][0]), ex.answers)
                            for r, ex in zip(records, examples)])
            assert row["answer recall@1"] == pytest.approx(top1), (mode, name)

    # bench/fusion_weights.py on the same run: at BM25 weight 0 either fusion is the dense row, and rrf at 0.5 is
    # the hybrid row retrieval.mode=hybrid serves by default; the setting it names is one of its own rows
    import bench.fusion_weights as fw

    first = {name: write_jsonl(tmp_path / f"{name}_30.jsonl", open(data[name]).read().splitlines()[:30])
             for name in SETS}
    fw_rows = fw.main(["--config", config, "--results", str(results), "--models", "qa_ict", "--fit", "nq_dev",
                       "--weights", "0,0.5,1", "--write-overrides", str(tmp_path / "fusion.txt"),
                       *(f"--questions={name}={first[name]}" for name in SETS), *overrides])
    cols = ["answer recall@1", "answer recall@5", "answer recall@20"]
    assert len(fw_rows) == len(SETS) * 2 * 3
    for fw_row in fw_rows:
        name = fw_row["questions"].split(" (")[0]
        same_as = {0.0: "models/qa_ict", 0.5: "models/qa_ict hybrid" if fw_row["fusion"] == "rrf" else None}
        if (other := same_as.get(fw_row["BM25 weight"])) is not None:
            assert [fw_row[c] for c in cols] == pytest.approx([by_name[(name, other)][c] for c in cols]), fw_row
    bm25_only = {(r["questions"], r["fusion"]): [r[c] for c in cols] for r in fw_rows if r["BM25 weight"] == 1.0}
    for name in SETS:  # at weight 1 BM25's first block leads (where BM25 matches nothing, a dense one may)
        key = next(q for q, _ in bm25_only if q.startswith(name))
        for fusion in ("rrf", "convex"):
            assert bm25_only[(key, fusion)][0] >= by_name[(name, "BM25 (bm25s)")]["answer recall@1"] - 1e-9
    section = results.read_text().split("\n## ")[1]
    chosen = (tmp_path / "fusion.txt").read_text().strip()
    assert section.startswith("Hybrid fusion and BM25 weight")
    assert f"- note: qa_ict: best answer recall@5 on nq_dev: {chosen} (" in section
    fusion, weight = (kv.split("=")[1] for kv in chosen.split())  # the overrides a config takes
    assert load_config(config, [*overrides, *chosen.split()]).retrieval.bm25_weight == float(weight)
    fit_rows = [r for r in fw_rows if r["questions"].startswith("nq_dev (") and 0 < r["BM25 weight"] < 1]
    best = max(r["answer recall@5"] for r in fit_rows)
    assert any(r["fusion"] == fusion and r["BM25 weight"] == float(weight) and r["answer recall@5"] == best
               for r in fit_rows)
