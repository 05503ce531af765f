"""index.kind: approximate faiss indexes (ivf, hnsw, ivfpq) for inference, measured against the exact flat index,
and read by the QA consumers (never by pre-training)."""
import json

import numpy as np
import pytest

import launch
from cluster.config import load_config
from core.errors import InputError
from indexer.approx import IndexSpec, recall_against_flat
from indexer.shards import ShardedIndex
from tests.conftest import ROOT, small_qa_run


@pytest.fixture(scope="module")
def clustered():
    """3,000 rows around 40 centres (as real embeddings cluster by topic) and 64 queries near the rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32)).astype(np.float32)
    rows = centres[rng.integers(40, size=3000)] + 0.3 * rng.normal(size=(3000, 32)).astype(np.float32)
    queries = rows[rng.integers(3000, size=64)] + 0.1 * rng.normal(size=(64, 32)).astype(np.float32)
    return rows.astype(np.float32), queries.astype(np.float32)


def test_each_kind_against_the_exact_index(clustered):
    rows, queries = clustered
    k = 10
    _, exact = ShardedIndex(rows, 2).search(queries, k)
    recall = {}
    specs = (IndexSpec("ivf", nprobe=4), IndexSpec("ivf", nprobe=16), IndexSpec("hnsw"), IndexSpec("ivfpq", pq_m=8))
    for spec in specs:
        index = ShardedIndex(rows, 2, spec=spec)
        scores, ids = index.search(queries, k)
        assert ids.shape == (64, k) and (ids >= 0).all() and (np.diff(scores, axis=1) <= 1e-5).all()  # best first
        recall[(spec.kind, spec.nprobe)] = recall_against_flat(ids, exact)
    assert recall[("ivf", 4)] <= recall[("ivf", 16)]  # more cells scanned, never fewer true neighbours
    assert recall[("ivf", 16)] >= 0.9 and recall[("hnsw", 16)] >= 0.9
    assert 0.2 <= recall[("ivfpq", 16)] < 1.0  # 8 bytes a row instead of 128: approximate, not useless
    # scanning every cell is exact
    nlist = int(IndexSpec("ivf").factory(1500, 32).split(",")[0][3:])
    _, every_cell = ShardedIndex(rows, 2, spec=IndexSpec("ivf", nprobe=nlist)).search(queries, k)
    assert recall_against_flat(every_cell, exact) == 1.0


def test_dead_blocks_and_exclusions_hold_in_an_approximate_index(clustered):
    rows, queries = clustered
    dead = np.arange(0, 3000, 3)
    index = ShardedIndex(rows, 1, dead=dead, spec=IndexSpec("hnsw"))
    _, ids = index.search(queries, 20)
    assert not set(ids.ravel().tolist()) & set(dead.tolist())
    exclude = ids[:, :2]
    _, again = index.search(queries, 5, exclude)
    assert not any(set(a.tolist()) & set(e.tolist()) for a, e in zip(again, exclude))
    assert index.with_spec(IndexSpec("hnsw")) is index
    assert index.with_spec(IndexSpec()).spec.kind == "flat"


def test_a_small_corpus_still_builds_every_kind():
    rows = np.random.default_rng(1).normal(size=(30, 16)).astype(np.float32)
    for kind in ("ivf", "hnsw", "ivfpq"):
        _, ids = ShardedIndex(rows, 1, spec=IndexSpec(kind, pq_m=4)).search(rows[:3], 40)
        assert (ids[:, 30:] == -1).all()  # k past the rows: padded


def test_the_qa_consumers_read_index_kind(tmp_path):
    small = small_qa_run(tmp_path)
    run, data = small["run"], small["data"]

    def cfg(command, *extra):
        return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run}", "model.query_max_len=32",
                                                              "model.reader_max_len=96", "threads=2", *extra], command)

    qa = f"data.qa_eval={data['qa_eval']}"
    flat = launch.run_command("evaluate", cfg("evaluate", "task=openqa", qa))
    flat_preds = [json.loads(line)["top_k"] for line in open(run / "predictions.jsonl")]
    # 40 blocks: one cell scanned whole is the exact search, so the answers are the flat index's
    ivf = launch.run_command("evaluate", cfg("evaluate", "task=openqa", qa, "index.kind=ivf", "index.nprobe=64"))
    ivf_preds = [json.loads(line)["top_k"] for line in open(run / "predictions.jsonl")]
    assert (flat["index_kind"], ivf["index_kind"]) == ("flat", "ivf")
    assert ivf_preds == flat_preds and ivf["exact_match"] == flat["exact_match"]
    mlm = launch.run_command("evaluate", cfg("evaluate", "index.kind=hnsw", "eval.model=ict",
                                             f"data.eval={data['eval']}", "data.max_eval_examples=8"))
    assert mlm["index_kind"] == "hnsw" and mlm["n"] == 8
    out = launch.run_command("query", cfg("query", "question=Where was Ada born?", "index.kind=ivfpq", "index.pq_m=4"))
    assert len(out["blocks"]) == 3


@pytest.mark.parametrize("overrides,key", [(["index.kind=annoy"], "index.kind"),
                                           (["index.kind=ivfpq", "index.pq_m=7"], "index.pq_m"),
                                           (["index.nprobe=0"], "index.nprobe"),
                                           (["index.nlist=-1"], "index.nlist")])
def test_bad_index_settings_fail_in_one_line(overrides, key):
    with pytest.raises(InputError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", overrides, "evaluate")
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_pre_training_searches_exactly(tmp_path, capsys):
    rc = launch.main(["pretrain", f"run_dir={tmp_path / 'run'}", "index.kind=hnsw"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "'index.kind'" in err and "evaluate" in err
