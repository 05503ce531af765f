"""SQuAD-open end to end on a slice of the real data (55 Wikipedia paragraphs, a random tiny BERT, a few
steps): the documented command, scripts/squad_open.sh, runs prepare -> ICT -> fine-tuning from ICT ->
REALM pre-training -> fine-tuning from REALM -> the retrieval comparison; `launch.py query` then answers."""
import json
import os
import re
import subprocess
import sys

import pytest

from bench.retrieval_compare import HEADER
from tests.conftest import ROOT, TINY_MODEL, write_jsonl
from tests.test_bench_smoke import table

DATA = ROOT.parent / "shared" / "data" / "squad_open"
ARTICLES = {"squad-dev-01": 30, "squad-dev-10": 25}  # Warsaw (training questions), Geology (dev questions)
ROWS = ["BM25 (bm25s)", "random off the shelf", "models/ict", "models/realm", "models/qa", "models/qa hybrid",
        "models/qa_ict", "models/qa_ict hybrid"]

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (the shared data) is not here")


def squad_slice(out):
    """The first paragraphs of two articles and the questions whose gold paragraph is among them."""
    out.mkdir()
    docs, taken = [], dict.fromkeys(ARTICLES, 0)
    for line in open(DATA / "corpus.jsonl"):
        article = json.loads(line)["id"].rsplit("-", 1)[0]
        if article in taken and taken[article] < ARTICLES[article]:
            taken[article] += 1
            docs.append(line.strip())
    ids = {json.loads(d)["id"] for d in docs}
    paths = {"corpus": write_jsonl(out / "corpus.jsonl", docs)}
    for split in ("qa_train", "qa_dev"):
        rows = [line.strip() for line in open(DATA / f"{split}.jsonl") if json.loads(line)["gold_id"] in ids]
        paths[split] = write_jsonl(out / f"{split}.jsonl", rows)
    return paths


def test_recipe_runs_end_to_end_and_writes_the_comparison(tmp_path, capsys):
    data = squad_slice(tmp_path / "data")
    results, plot = tmp_path / "RESULTS.md", tmp_path / "recall.png"
    results.write_text(HEADER + "\n## An earlier comparison\n\n| retriever |\n| --- |\n| old |\n")
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.corpus={data['corpus']}", f"data.qa_train={data['qa_train']}",
                 f"data.qa_eval={data['qa_dev']}", *TINY_MODEL, "threads=1", "ict.steps=2", "ict.batch_size=8",
                 "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.freeze_retriever_steps=1",
                 "pretrain.own_block_steps=1", "refresh.every_steps=2", "finetune.steps=2", "finetune.batch_size=4"]
    env = dict(os.environ, PYTHON=sys.executable, RESULTS=str(results), PLOT=str(plot), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "squad_open.sh"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    text = results.read_text()
    assert text.startswith(HEADER)
    assert text.index("## Retrieval comparison, squad_open") < text.index("## An earlier comparison")
    for key in ("- commit:", "- cpu:", "- config: config=", "- command: `python -m bench.retrieval_compare"):
        assert key in text
    written = table(text, "retriever")
    assert {r["questions"] for r in written} == {"qa_dev"}  # data.qa_eval, named by its file
    rows = {r["retriever"]: r for r in written}
    assert list(rows) == ROWS
    for name, row in rows.items():
        recall = [float(row[f"recall@{k}"]) for k in (1, 5, 20)]
        assert 0 <= recall[0] <= recall[1] <= recall[2] <= 1, name
        answer_recall = [float(row[f"answer recall@{k}"]) for k in (1, 5, 20, 100)]
        assert 0 <= answer_recall[0] <= answer_recall[1] <= answer_recall[2] <= answer_recall[3] <= 1, name
        assert (row["EM (top 2)"] != "") == name.startswith("models/qa"), name
        if row["EM (top 2)"]:
            assert 0 <= float(row["EM (top 2)"]) <= 1
    chance = float(re.search(r"chance at k=20: about ([0-9.]+)", text)[1])
    bm25 = rows["BM25 (bm25s)"]
    assert float(bm25["recall@20"]) > chance + 0.3 and float(bm25["recall@1"]) > 0.5  # the questions reuse its words
    assert plot.read_bytes().startswith(b"\x89PNG")
    inits = {name: json.loads((tmp_path / "run" / "models" / name / "realm.json").read_text())["init"]
             for name in ("qa", "qa_ict")}
    assert inits == {"qa": "realm", "qa_ict": "ict"}

    import launch

    assert launch.main(["--config", str(ROOT / "configs" / "squad_open.yaml"), "--json", "query", *overrides,
                        "--pipeline", "prepare,ict,pretrain,finetune,evaluate,query",
                        "question=What is the third type of rock?"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["question"] == "What is the third type of rock?" and len(answer["blocks"]) == 2


def test_gpu_config_scales_the_cpu_recipe_up():
    from cluster.config import load_config

    cpu, gpu = (load_config(ROOT / "configs" / f"{name}.yaml") for name in ("squad_open", "squad_open_gpu"))
    assert gpu.device == "cuda" and gpu.data == cpu.data and gpu.model == cpu.model
    for stage in ("ict", "pretrain", "finetune"):
        assert getattr(gpu, stage).steps > getattr(cpu, stage).steps
        assert getattr(gpu, stage).batch_size > getattr(cpu, stage).batch_size
