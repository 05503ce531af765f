"""retrieval.mode (dense | bm25 | hybrid) for every consumer: the BM25 index `prepare` builds into the block store
(versioned with it: an edit rebuilds it), reciprocal rank fusion, and QA, evaluation, query and explain reading
exactly the candidates the mode retrieves."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

import launch
from cluster.config import load_config
from core.errors import InputError
from core.files import verify_manifest
from indexer.blocks import BLOCK_SCHEMA, BlockStore
from indexer.corpus_versions import current_store_dir
from indexer.fusion import convex_fusion, fuse, reciprocal_rank_fusion
from indexer.lexical import LexicalIndex, build_bm25
from tests.conftest import ROOT, small_qa_run, write_jsonl

LENGTHS = ["model.query_max_len=32", "model.reader_max_len=96", "threads=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    small = small_qa_run(tmp_path_factory.mktemp("modes"))
    data = small["data"]
    return {"run": small["run"], "data": data,
            "corpus": [json.loads(line) for line in open(data["corpus"])],
            "qa_eval": [json.loads(line) for line in open(data["qa_eval"])]}


def cfg_for(run_dir, command, *overrides):
    lengths = LENGTHS if command in ("query", "explain", "evaluate") else ["threads=2"]  # edits read no lengths
    return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *lengths, *overrides], command)


# ---- the BM25 index and the fusion, on their own ----------------------------------------------------

def _table(rows):
    return pa.table({"block_id": list(range(len(rows))), "doc_id": [f"d{i}" for i in range(len(rows))],
                     "title": [t for t, _ in rows], "text": [x for _, x in rows],
                     "token_ids": [[1] for _ in rows]}, schema=BLOCK_SCHEMA)


def test_bm25_ranks_by_shared_terms_and_leaves_out_dead_and_excluded_blocks(tmp_path):
    table = _table([("Paris", "Paris is the capital of France."), ("Rome", "Rome has the Colosseum, in Italy."),
                    ("Lisbon", "Lisbon lies on the Tagus."), ("Oslo", "Oslo is the capital of Norway.")])
    build_bm25(table.to_batches(), np.array([2]), tmp_path / "bm25")
    ix = LexicalIndex(tmp_path / "bm25")
    assert len(ix) == 3  # the dead block is not indexed at all
    scores, ids = ix.search(["capital of Norway", "Colosseum", "Tagus", "the of and"], 3)
    assert ids[0, 0] == 3 and ids[0, 1] == 0 and ids[0, 2] == -1  # Norway+capital, then capital; no match: -1
    assert scores[0, 0] > scores[0, 1] > 0 and scores[0, 2] == -np.inf
    assert ids[1].tolist() == [1, -1, -1]
    assert ids[2].tolist() == [-1, -1, -1]  # only the dead block has the word
    assert ids[3].tolist() == [-1, -1, -1]  # stop words only
    _, ids = ix.search(["capital of Norway"], 2, exclude=np.array([[3, -1]]))
    assert ids.tolist() == [[0, -1]]


@pytest.mark.parametrize("chunk_rows", [1, 64, 100_000])
def test_bm25_build_writes_what_bm25s_writes(tmp_path, monkeypatch, chunk_rows):
    """build_bm25 streams (a chunk of blocks at a time, the matrix written column by column into mapped
    files); its files are byte for byte those of bm25s's own `index` over the same term ids, for blocks
    with no terms, with stop words only and with dead blocks among them, whatever the chunk size."""
    import bm25s

    import indexer.lexical as lexical

    rng = np.random.default_rng(chunk_rows)
    words = ["the", "of", "and", "capital", "Paris", "rome", "x"] + [f"w{i}" for i in range(200)]
    rows = [(f"T{i}" if i % 7 else "", " ".join(rng.choice(words, rng.integers(0, 30)))) for i in range(500)]
    rows[10] = ("", "the of and")  # stop words only: no terms
    table, dead = _table(rows), np.array([3, 50, 499])
    monkeypatch.setattr(lexical, "CHUNK_ROWS", chunk_rows)
    build_bm25(table.to_batches(max_chunksize=64), dead, tmp_path / "ours")
    vocab: dict[str, int] = {}
    texts = [t for _, t in lexical.block_texts(table.to_batches(), dead)]
    ref = bm25s.BM25()
    ref.index(bm25s.tokenization.Tokenized(
        ids=[[vocab.setdefault(w, len(vocab)) for w in ws] for ws in lexical.terms(texts)], vocab=vocab),
        show_progress=False)
    ref.save(str(tmp_path / "ref"), show_progress=False)
    for f in sorted((tmp_path / "ref").iterdir()):
        assert f.read_bytes() == (tmp_path / "ours" / f.name).read_bytes(), f.name
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(
        [*(p.name for p in (tmp_path / "ref").iterdir()), "block_ids.npy", "meta.json"])  # no scratch file left
    assert np.load(tmp_path / "ours" / "block_ids.npy").tolist() == [b for b in range(500) if b not in (3, 50, 499)]


def test_reciprocal_rank_fusion():
    dense = np.array([[5, 1, 2, -1], [7, 8, 9, -1]])
    lexical = np.array([[1, 3, -1, -1], [9, 8, 7, -1]])
    fused = reciprocal_rank_fusion([dense, lexical], 4)
    # 1 is second in one list and first in the other: above 5, which only the dense list has at rank 1
    assert fused[0].tolist() == [1, 5, 3, 2]
    # 7 and 9 (1/61 + 1/63 each) edge out 8, second in both (2/62); of the tie, the dense list's first wins
    assert fused[1].tolist() == [7, 9, 8, -1]
    assert reciprocal_rank_fusion([dense[:, :1], np.full((2, 1), -1)], 3).tolist() == [[5, -1, -1], [7, -1, -1]]
    # weights: BM25's list alone decides at dense weight 0 (the dense-only blocks after it, in dense order)
    assert reciprocal_rank_fusion([dense, lexical], 4, weights=[0.0, 1.0])[0].tolist() == [1, 3, 5, 2]


def test_convex_fusion_keeps_how_far_apart_the_scores_are():
    dense_ids = np.array([[5, 1, 2, -1]])
    dense_scores = np.array([[0.9, 0.8, 0.7, -np.inf]])      # min-max: 5 -> 1, 1 -> 0.5, 2 -> 0
    bm25_ids = np.array([[3, 1, 2, -1]])
    bm25_scores = np.array([[20.0, 2.0, 0.0, -np.inf]])      # min-max: 3 -> 1, 1 -> 0.1, 2 -> 0
    # equal weights: 5 and 3 tie at 0.5 (the dense list's first wins), then 1 (0.5 * 0.5 + 0.5 * 0.1 = 0.3), 2
    assert convex_fusion([dense_scores, bm25_scores], [dense_ids, bm25_ids], 4).tolist() == [[5, 3, 1, 2]]
    # RRF sees only ranks: 1 and 2, in both lists, beat both firsts
    assert reciprocal_rank_fusion([dense_ids, bm25_ids], 4).tolist() == [[1, 2, 5, 3]]
    # BM25 weighted 0.7: its far-ahead first block leads
    fused = fuse("convex", (dense_scores, dense_ids), (bm25_scores, bm25_ids), 2, bm25_weight=0.7)
    assert fused.tolist() == [[3, 5]]
    # a list whose scores are all equal gives each of its blocks 1; an empty one adds nothing
    assert convex_fusion([np.array([[1.0, 1.0]]), np.full((1, 2), -np.inf)], [np.array([[4, 6]]), np.full((1, 2), -1)],
                         3).tolist() == [[4, 6, -1]]
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse("max", (dense_scores, dense_ids), (bm25_scores, bm25_ids), 2)


# ---- built by prepare, versioned with the store ------------------------------------------------------

def test_prepare_writes_the_bm25_index_into_the_block_store(trained):
    store = BlockStore(trained["run"] / "blocks")
    manifest = verify_manifest(store.dir)  # its files are covered by the store's checksums
    assert any(name.startswith("bm25/") for name in manifest["files"])
    ix = LexicalIndex(store.bm25_dir)
    assert len(ix) == len(store)
    # a person's name is in their document only: BM25 finds it first
    for doc in trained["corpus"][:10]:
        _, ids = ix.search([doc["title"]], 1)
        assert store.doc_id(int(ids[0, 0])) == doc["id"]


def test_an_edit_rebuilds_the_index_for_the_new_store_version(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    gone, replaced = trained["corpus"][0], trained["corpus"][1]
    changes = write_jsonl(tmp_path / "changes.jsonl", [
        {"id": gone["id"], "delete": True},
        {"id": replaced["id"], "title": replaced["title"], "text": f"{replaced['title']} collects zeppelins."},
        {"id": "new", "title": "Quorvath Plimsey", "text": "Quorvath Plimsey was born in Reykjavik."}])
    launch.run_command("update-corpus", cfg_for(run, "update-corpus", f"changes={changes}"))
    store = BlockStore(current_store_dir(run))
    assert store.version > 0 and store.bm25_dir.is_dir()
    ix = LexicalIndex(store.bm25_dir)
    assert len(ix) == store.num_live
    _, ids = ix.search(["Quorvath Plimsey Reykjavik"], 1)
    assert store.doc_id(int(ids[0, 0])) == "new"
    _, ids = ix.search(["zeppelins"], 1)
    assert store.doc_id(int(ids[0, 0])) == replaced["id"]
    _, ids = ix.search([gone["title"], replaced["text"]], len(store))
    assert not set(ids.ravel().tolist()) & set(store.dead.tolist())  # deleted and replaced blocks: never
    # the version before the edit keeps its own index, untouched
    assert len(LexicalIndex(run / "blocks" / "bm25")) == len(BlockStore(run / "blocks"))


# ---- every consumer reads what the mode retrieves ----------------------------------------------------

def test_qa_system_reads_the_candidates_of_its_mode(trained):
    from indexer.embed import pad_batch
    from trainer.qa_system import load_qa_system

    questions = [q["question"] for q in trained["qa_eval"][:6]]
    k = 3
    systems = {m: load_qa_system(cfg_for(trained["run"], "query", f"retrieval.mode={m}", f"finetune.k={k}"), "auto")
               for m in ("dense", "bm25", "hybrid")}
    preds = {m: s.predict(questions, k, 5) for m, s in systems.items()}
    dense_sys = systems["dense"]
    q_ids, q_mask = pad_batch(dense_sys.encode_questions(questions), dense_sys.run.vocab.pad)
    emb = dense_sys.model.retriever.embed_queries(q_ids, q_mask).detach().float().numpy()
    dense_ids = dense_sys.index.search(emb, 100)[1]
    bm25_ids = LexicalIndex(dense_sys.run.store.bm25_dir).search(questions, 100)[1]
    assert [p["top_k"] for p in preds["dense"]] == dense_ids[:, :k].tolist()
    assert [p["top_k"] for p in preds["bm25"]] == bm25_ids[:, :k].tolist()
    assert [p["top_k"] for p in preds["hybrid"]] == reciprocal_rank_fusion([dense_ids, bm25_ids], k).tolist()
    convex = load_qa_system(cfg_for(trained["run"], "query", "retrieval.mode=hybrid", "retrieval.fusion=convex",
                                    "retrieval.bm25_weight=0.3", f"finetune.k={k}"), "auto")
    expected = fuse("convex", dense_sys.index.search(emb, 100), LexicalIndex(dense_sys.run.store.bm25_dir).search(
        questions, 100), k, 0.3)
    assert [p["top_k"] for p in convex.predict(questions, k, 5)] == expected.tolist()
    for p in preds["bm25"]:  # p(z|x) is the model's own inner product over the BM25 candidates
        assert np.isclose(sum(p["p_z"]), 1.0)
        assert np.isfinite(p["scores"]).tolist() == [b >= 0 for b in p["top_k"]]  # fewer matches: -1, p(z|x) 0
        assert p["block_id"] in p["top_k"]  # the answer is read from one of them


def test_evaluate_and_query_follow_the_mode(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    n = "data.max_eval_examples=40"
    qa_eval = f"data.qa_eval={trained['data']['qa_eval']}"
    metrics = {m: launch.run_command("evaluate", cfg_for(run, "evaluate", "task=openqa", qa_eval, n,
                                                         f"retrieval.mode={m}"))
               for m in ("dense", "bm25", "hybrid")}
    assert {m: v["retrieval_mode"] for m, v in metrics.items()} == {m: m for m in metrics}
    # the questions name their person; a 2-step random model's dense retrieval barely beats chance, BM25 does not
    assert metrics["bm25"]["retrieval_recall_at_k"] > metrics["dense"]["retrieval_recall_at_k"] + 0.3
    assert metrics["hybrid"]["retrieval_recall_at_k"] > metrics["dense"]["retrieval_recall_at_k"]
    preds = [json.loads(line) for line in open(run / "predictions.jsonl")]  # the last one: hybrid
    assert len(preds) == metrics["hybrid"]["n"] and all(len(p["top_k"]) == 3 for p in preds)
    # masked spans too, own block excluded as in every mode
    mlm = {m: launch.run_command("evaluate", cfg_for(run, "evaluate", f"data.eval={trained['data']['eval']}",
                                                     n, f"retrieval.mode={m}", "eval.model=ict"))
           for m in ("dense", "bm25")}
    assert mlm["bm25"]["retrieval_mode"] == "bm25" and mlm["bm25"]["n"] == mlm["dense"]["n"]
    assert mlm["bm25"]["retrieval_recall_at_k"] > mlm["dense"]["retrieval_recall_at_k"]
    question = trained["qa_eval"][0]
    out = launch.run_command("query", cfg_for(run, "query", f"question={question['question']}", "retrieval.mode=bm25"))
    store = BlockStore(run / "blocks")
    assert store.doc_id(out["blocks"][0]["block_id"]) == question["gold_id"]


@pytest.mark.parametrize("overrides,key", [(["retrieval.mode=sparse"], "retrieval.mode"),
                                           (["retrieval.mode=bm25", "finetune.retrieval=random"], "retrieval.mode"),
                                           (["retrieval.fusion_depth=0"], "retrieval.fusion_depth"),
                                           (["retrieval.rrf_k=-1"], "retrieval.rrf_k"),
                                           (["retrieval.fusion=max"], "retrieval.fusion"),
                                           (["retrieval.bm25_weight=1.5"], "retrieval.bm25_weight")])
def test_bad_retrieval_settings_fail_in_one_line(overrides, key):
    with pytest.raises(InputError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", overrides, "query")
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_pretraining_does_not_take_a_retrieval_mode(tmp_path, capsys):
    rc = launch.main(["pretrain", f"run_dir={tmp_path / 'run'}", "retrieval.mode=bm25"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "'retrieval.mode'" in err and "finetune" in err and "query" in err


def test_a_store_without_a_bm25_index_is_named(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    shutil.rmtree(run / "blocks" / "bm25")  # as a store written before stores carried one: not in its manifest
    manifest = json.loads((run / "blocks" / "manifest.json").read_text())
    manifest["files"] = {f: v for f, v in manifest["files"].items() if not f.startswith("bm25/")}
    (run / "blocks" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="no BM25 index.*reindex"):
        launch.run_command("query", cfg_for(run, "query", "question=who?", "retrieval.mode=hybrid"))
    assert launch.run_command("query", cfg_for(run, "query", "question=who?"))["blocks"]  # dense needs none
