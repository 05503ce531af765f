"""The wiki_vital recipe end to end on a slice of the real data (a few dozen Wikipedia leads, the NQ-open and
WebQuestions questions they answer, a random tiny BERT, a few steps): the documented command,
scripts/wiki_vital.sh, runs prepare -> ICT -> fine-tuning from ICT -> REALM pre-training -> fine-tuning from
REALM -> masked spans on held-out articles -> the retrieval comparison on both question sets."""
import json
import os
import subprocess
import sys

import pytest

from bench.retrieval_compare import HEADER
from tests.conftest import ROOT, TINY_MODEL, write_jsonl
from tests.test_bench_smoke import table
from trainer.qa import normalize_answer

DATA = ROOT.parent / "shared" / "data" / "wiki_vital"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (the shared data) is not here")


def wiki_slice(out, per_set=(("nq_train", 16), ("nq_dev", 6), ("webquestions_test", 6)), filler=30):
    """The first `filler` leads, plus for the first questions of each set a lead that holds an answer; the
    questions whose answer is then in the slice."""
    out.mkdir()
    docs = [json.loads(line) for line in open(DATA / "corpus.jsonl")]
    norm = [f" {normalize_answer(d['title'] + ' ' + d['text'])} " for d in docs]
    questions = {name: [json.loads(line) for line in open(DATA / f"{name}.jsonl")][:n] for name, n in per_set}
    keep = set(range(filler))
    for rows in questions.values():
        for q in rows:
            keep.add(next((i for i, t in enumerate(norm) for a in q["answers"] if f" {normalize_answer(a)} " in t), 0))
    paths = {"corpus": write_jsonl(out / "corpus.jsonl", [docs[i] for i in sorted(keep)])}
    for name, rows in questions.items():
        found = [q for q in rows if any(f" {normalize_answer(a)} " in norm[i] for i in keep for a in q["answers"])]
        paths[name] = write_jsonl(out / f"{name}.jsonl", found)
    return paths


def test_recipe_runs_end_to_end_and_writes_both_tables(tmp_path):
    data = wiki_slice(tmp_path / "data")
    results, plot = tmp_path / "RESULTS.md", tmp_path / "recall.png"
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.corpus={data['corpus']}", f"data.qa_train={data['nq_train']}",
                 f"data.qa_eval={data['nq_dev']}", *TINY_MODEL, "model.reader_layers=2", "model.copy_layer=1",
                 "threads=1", "ict.steps=2", "ict.batch_size=8",
                 "model.proj_init_blocks=20", "data.eval_fraction=0.1", "data.max_eval_examples=30",
                 "pretrain.steps=4", "pretrain.batch_size=4", "pretrain.freeze_retriever_steps=2",
                 "pretrain.own_block_steps=1", "refresh.every_steps=2", "finetune.steps=2", "finetune.batch_size=4",
                 "finetune.early_k=8",  # the config's 100 is more than the slice's blocks
                 "cluster.backend=local"]  # the recipe's Ray path is the squad_open test's; here its stages
    env = dict(os.environ, PYTHON=sys.executable, RESULTS=str(results), PLOT=str(plot), DATA=str(tmp_path / "data"),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "wiki_vital.sh"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    text = results.read_text()
    assert text.startswith(HEADER)
    # newest first: the comparison ran last
    assert text.index("## Retrieval comparison, wiki_vital") < text.index("## Hybrid fusion and BM25 weight") \
        < text.index("## Masked spans on held-out text")
    # the comparison's hybrid rows use the fusion fitted on nq_train
    fusion = text[text.index("## Hybrid fusion"):text.index("## Masked spans")]
    chosen = fusion.split("- note: qa: best answer recall@5 on nq_train: ")[1].split(" (")[0]
    setting = dict(kv.split("=") for kv in chosen.split())
    line = text[:text.index("## Hybrid fusion")].split("- config: ")[1].split("\n")[0]
    compared = dict(kv.split("=", 1) for kv in line.split(", ") if kv.startswith("retrieval."))
    assert compared["retrieval.fusion"] == setting["retrieval.fusion"], (chosen, line)
    assert float(compared["retrieval.bm25_weight"]) == float(setting["retrieval.bm25_weight"]), (chosen, line)
    spans = {r["retriever"]: r for r in table(text[text.index("## Masked spans"):], "retriever")}
    assert list(spans) == ["REALM retriever", "ICT retriever", "BM25", "hybrid: BM25 + REALM",
                           "none (null document only)"]
    for name, row in spans.items():
        assert 0 <= float(row["masked-span accuracy"]) <= 1
        if name != "none (null document only)":
            assert 0 <= float(row["span in top-k"]) <= 1
    compare = table(text[:text.index("## Masked spans")], "retriever")
    assert {r["questions"] for r in compare} == {"nq_dev", "webquestions_test"}
    assert plot.is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] > 0
    # the config's copy head (its layer and identity start) reached the pre-trained model
    realm = json.loads((tmp_path / "run" / "models" / "realm" / "realm.json").read_text())
    assert (realm["reader_head"], realm["copy_layer"], realm["copy_init"]) == ("copy", 1, "identity")
