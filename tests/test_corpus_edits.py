"""`launch.py update-corpus` and `reindex`: edits re-embed only the changed documents with the QA model's doc
encoder, keep unchanged block ids, never return a deleted block, equal a full rebuild's top-k, commit the
store and index versions as one pair (a crash leaves the old pair), and refuse bad change files in one line."""
import json
import shutil

import numpy as np
import pytest

import launch
from cluster.config import load_config
from indexer.blocks import BlockStore
from indexer.corpus_versions import read_pointer
from tests.conftest import ROOT, TINY_MODEL, small_qa_run, write_jsonl

# the tiny model's lengths (read from the config, not the checkpoint)
LENGTHS = ["model.query_max_len=32", "model.reader_max_len=96", "threads=2"]
K = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared run with an ICT model and a QA model fine-tuned from it (its doc encoder: ICT's)."""
    small = small_qa_run(tmp_path_factory.mktemp("edits"), "finetune.init=ict")
    run, data = small["run"], small["data"]
    corpus = [json.loads(line) for line in open(data["corpus"])]
    questions = [json.loads(line)["question"] for line in open(data["qa_eval"])][:12]
    return {"run": run, "data": data, "corpus": corpus, "questions": questions}


@pytest.fixture
def run_dir(trained, tmp_path):
    """A fresh copy of the trained run for each test (tests edit it)."""
    dst = tmp_path / "run"
    shutil.copytree(trained["run"], dst)
    return dst


def cfg_for(run_dir, command, *overrides):
    lengths = LENGTHS if command in ("query", "explain", "evaluate") else ["threads=2"]  # the edits read no lengths
    return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *lengths, *overrides], command)


def top_k(run_dir, questions, k=K):
    """[(doc id, block text, score) best first] per question, from the QA system `query` builds."""
    from trainer.qa_system import load_qa_system

    system = load_qa_system(cfg_for(run_dir, "query", f"finetune.k={k}"), "auto")
    _, ids = system.index.search(system.model.retriever.embed_queries(
        *[t.to(system.run.device) for t in _pad(system, questions)]).detach().float().cpu().numpy(), k)
    store = system.run.store
    return system, [[(store.doc_id(int(b)), store.text(int(b))) for b in row if b >= 0] for row in ids]


def _pad(system, questions):
    from indexer.embed import pad_batch

    return pad_batch(system.encode_questions(questions), system.run.vocab.pad)


def update(run_dir, changes, *overrides):
    from trainer.corpus_edits import update_corpus

    return update_corpus(cfg_for(run_dir, "update-corpus", f"changes={changes}", *overrides))


def edited_corpus(corpus, upserts, deletes):
    """The corpus after the edits, in the edited store's order: unchanged documents, then the changed ones."""
    gone = set(deletes) | {d["id"] for d in upserts}
    return [d for d in corpus if d["id"] not in gone] + list(upserts)


def snapshot(run_dir):
    """Everything a commit would change: the pointer, the store versions, the index versions, temp dirs."""
    return {"pointer": (run_dir / "CORPUS").read_text() if (run_dir / "CORPUS").exists() else None,
            "store": sorted(p.name for p in (run_dir / "store").iterdir()) if (run_dir / "store").exists() else [],
            "index": sorted(p.name for p in (run_dir / "index").iterdir())}


def test_add_replace_delete_keeps_ids_and_moves_retrieval(trained, run_dir, tmp_path):
    corpus = trained["corpus"]
    q = trained["questions"][0]
    before_system, before = top_k(run_dir, [q], k=1)
    old_store = before_system.run.store
    x = before[0][0][0]  # the document the question retrieves first
    x_doc = next(d for d in corpus if d["id"] == x)
    victim = next(d["id"] for d in corpus if d["id"] != x)
    # x gets new text; its old text comes back as an added document y; another document is deleted
    upserts = [{"id": x, "title": "Nobody", "text": "Quentin Zorblax lived in a lighthouse for ninety winters."},
               {"id": "y-new", "title": x_doc["title"], "text": x_doc["text"]}]
    changes = write_jsonl(tmp_path / "changes.jsonl", [*upserts, {"id": victim, "delete": True}])
    old_rows = len(old_store)
    result = update(run_dir, changes)
    assert result["added_or_replaced"] == 2 and result["deleted"] == 1 and result["store_version"] == 1
    pointer = read_pointer(run_dir)
    assert pointer["store"] == "store/v0001" and pointer["index_version"] == result["index_version"]

    system, after = top_k(run_dir, [q], k=1)
    store = system.run.store
    assert store.version == 1 and len(store) == old_rows + result["blocks_embedded"]
    # the question about y (x's old text) retrieves y now, at the score x's old block had
    assert after[0][0] == ("y-new", before[0][0][1])
    # unchanged blocks: same ids, same text, same embedding rows (linked, not re-embedded)
    dead = set(store.dead.tolist())
    assert dead == set(old_store.doc_blocks(x)) | set(old_store.doc_blocks(victim))
    for b in range(old_rows):
        assert store.text(b) == old_store.text(b) and store.doc_id(b) == old_store.doc_id(b)
    live_old = [b for b in range(old_rows) if b not in dead]
    np.testing.assert_array_equal(system.index.embeddings[live_old], before_system.index.embeddings[live_old])
    # with k = every live block, the deleted and replaced blocks are never returned, every new one is
    _, everything = top_k(run_dir, [q, "lighthouse"], k=store.num_live)
    for row in everything:
        assert len(row) == store.num_live
        assert victim not in {d for d, _ in row}
        assert {t for d, t in row if d == x} == {store.text(b) for b in store.doc_blocks(x)}
        assert (("y-new", before[0][0][1]) in row)

    # a second edit on top of the first: ids keep growing, the first edit's blocks stay
    y_blocks = list(store.doc_blocks("y-new"))
    result2 = update(run_dir, write_jsonl(tmp_path / "c2.jsonl", [{"id": "z", "title": "Z", "text": "Zed lives."}]))
    store2 = BlockStore(run_dir / "store" / "v0002", verify=True)
    assert result2["store_version"] == 2 and list(store2.doc_blocks("y-new")) == y_blocks
    assert list(store2.doc_blocks("z")) == [len(store)] and set(store2.dead.tolist()) == dead


def test_edited_index_equals_a_full_rebuild(trained, run_dir, tmp_path):
    corpus = trained["corpus"]
    questions = [*trained["questions"], "Who founded the Vey observatory?", "Where was Ilsa Brandt born?"]
    _, original = top_k(run_dir, questions, k=10)
    hit = list(dict.fromkeys(d for row in original for d, _ in row[:2]))  # documents the old top-k returns
    upserts = [{"id": hit[0], "title": "Replaced", "text": "Ilsa Brandt was born in 1871 in Tromso."},
               {"id": "added-1", "title": "Added", "text": "Oskar Vey founded the Vey observatory in 1902."},
               {"id": "added-2", "title": "Added two", "text": " ".join(corpus[5]["text"].split()[::-1])}]
    deletes = hit[1:4]
    update(run_dir, write_jsonl(tmp_path / "changes.jsonl", [*upserts, *({"id": d, "delete": True} for d in deletes)]))
    edited_system, edited = top_k(run_dir, questions, k=10)

    rebuilt_dir = tmp_path / "rebuilt"
    shutil.copytree(trained["run"], rebuilt_dir)
    new_corpus = write_jsonl(tmp_path / "new_corpus.jsonl", edited_corpus(corpus, upserts, deletes))
    from trainer.corpus_edits import reindex

    out = reindex(cfg_for(rebuilt_dir, "reindex", f"data.corpus={new_corpus}"))
    rebuilt_system, rebuilt = top_k(rebuilt_dir, questions, k=10)
    assert out["blocks"] == edited_system.run.store.num_live == rebuilt_system.run.store.num_live
    assert edited == rebuilt and edited != original
    assert not {d for row in edited for d, _ in row} & set(deletes)


@pytest.mark.parametrize("where", ["index", "pointer"])
def test_a_crash_in_the_commit_leaves_the_old_pair(trained, run_dir, tmp_path, monkeypatch, where):
    import indexer.versions
    import trainer.corpus_edits

    def boom(*a, **kw):
        raise RuntimeError("crash")

    if where == "index":  # while the index version is written (the store version is complete)
        monkeypatch.setattr(indexer.versions.IndexVersions, "commit", boom)
    else:  # both versions complete, the pointer not yet moved
        monkeypatch.setattr(trainer.corpus_edits, "write_pointer", boom)
    _, before = top_k(run_dir, trained["questions"])
    state = snapshot(run_dir)
    changes = write_jsonl(tmp_path / "c.jsonl", [{"id": trained["corpus"][0]["id"], "delete": True},
                                                 {"id": "new", "title": "N", "text": "New text here."}])
    with pytest.raises(RuntimeError, match="crash"):
        update(run_dir, changes)
    monkeypatch.undo()
    assert snapshot(run_dir) == state  # no store version, index version, staging or temp dir behind
    assert read_pointer(run_dir) is None
    assert top_k(run_dir, trained["questions"])[1] == before
    assert update(run_dir, changes)["store_version"] >= 1  # and the edit goes through afterwards


@pytest.mark.parametrize("rows, line, message", [
    ([{"id": "d-none", "delete": True}], 1, "unknown id 'd-none' to delete"),
    ([{"id": "a", "title": "A", "text": "x y"}, {"id": "a", "delete": True}], 2, "duplicate id 'a'"),
    ([{"id": "a", "title": "A", "text": "ok"}, {"id": "b", "title": "B", "text": "  "}], 2, "field 'text' is empty"),
    ([{"id": "a", "title": "A", "text": "ok"}, '{"id": "b", "title": '], 2, "malformed JSON"),
])
def test_a_bad_change_file_is_one_line_and_commits_nothing(trained, run_dir, tmp_path, capsys, rows, line, message):
    changes = write_jsonl(tmp_path / "changes.jsonl", rows)
    state = snapshot(run_dir)
    rc = launch.main(["update-corpus", f"run_dir={run_dir}", "threads=2", f"changes={changes}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {changes}:{line}: ") and message in err[0]
    assert snapshot(run_dir) == state


def test_update_corpus_needs_a_file_and_reindex_a_corpus(run_dir, capsys):
    assert launch.main(["update-corpus", f"run_dir={run_dir}", "threads=2"]) == 2
    assert "config key 'changes'" in capsys.readouterr().err
    assert launch.main(["reindex", f"run_dir={run_dir}", "threads=2"]) == 2
    assert "config key 'data.corpus'" in capsys.readouterr().err


def test_query_evaluate_explain_read_the_newest_pair(trained, run_dir, tmp_path, capsys):
    corpus = trained["corpus"]
    deleted = {d["id"] for d in corpus[:30]}  # most of the corpus: the old top-k would surely hit them
    changes = write_jsonl(tmp_path / "c.jsonl", [{"id": d, "delete": True} for d in sorted(deleted)]
                          + [{"id": "fresh", "title": "Fresh", "text": "Mira Tolk was born in Ostend in 1950."}])
    assert launch.main(["update-corpus", f"run_dir={run_dir}", "threads=2", f"changes={changes}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    store = BlockStore(run_dir / "store" / "v0001")
    q = trained["questions"][0]

    assert launch.main(["query", f"run_dir={run_dir}", *LENGTHS, "finetune.k=5", "--json", f"question={q}"]) == 0
    blocks = json.loads(capsys.readouterr().out)["blocks"]
    assert len(blocks) == 5 and all(store.doc_id(b["block_id"]) not in deleted for b in blocks)

    assert launch.main(["explain", f"run_dir={run_dir}", *LENGTHS, "finetune.k=5", "--json", f"question={q}"]) == 0
    rows = json.loads(capsys.readouterr().out)["blocks"]
    assert rows and all(r["doc_id"] not in deleted for r in rows if r["block_id"] is not None)

    assert launch.main(["evaluate", f"run_dir={run_dir}", *LENGTHS, "task=openqa", "finetune.k=5",
                        f"data.qa_eval={trained['data']['qa_eval']}", "data.max_eval_examples=6"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["index_version"] == summary["index_version"]
    preds = [json.loads(line) for line in open(run_dir / "predictions.jsonl")]
    assert all(store.doc_id(b) not in deleted for p in preds for b in p["top_k"])


def test_a_parquet_change_file_reads_like_jsonl(trained, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indexer.corpus_versions import read_changes

    store = BlockStore(trained["run"] / "blocks")
    victim = trained["corpus"][1]["id"]
    path = tmp_path / "changes.parquet"
    pq.write_table(pa.table({"id": ["p1", victim], "title": ["P", None], "text": ["Some text.", None],
                             "delete": [None, True]}), path)
    changes = read_changes(path, store, 10**7)
    assert [d.doc_id for d in changes.upserts] == ["p1"] and changes.deletes == [victim]


def test_ray_pretraining_refuses_an_edited_run_and_prepare_resets_it(trained, run_dir, tmp_path, capsys):
    changes = write_jsonl(tmp_path / "c.jsonl", [{"id": "n", "title": "N", "text": "New text here."}])
    update(run_dir, changes)
    capsys.readouterr()
    rc = launch.main(["pretrain", f"run_dir={run_dir}", "cluster.backend=ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "CORPUS: the corpus was edited" in err[0]
    from trainer.prepare import prepare
    from trainer.run import Run

    data = trained["data"]
    prepare(load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", f"data.corpus={data['corpus']}",
                                                        f"data.pretrain={data['pretrain']}", "masking.ner=regex"]))
    assert read_pointer(run_dir) is None
    assert Run.open(cfg_for(run_dir, "query")).store.dir == run_dir / "blocks"
    assert update(run_dir, changes)["store_version"] == 2  # store numbers are never reused


def test_a_second_writer_is_refused_while_one_edits(run_dir, tmp_path):
    from core.errors import InputError
    from core.files import exclusive_lock
    from trainer.corpus_edits import LOCK

    changes = write_jsonl(tmp_path / "c.jsonl", [{"id": "n", "title": "N", "text": "New text here."}])
    state = snapshot(run_dir)
    with exclusive_lock(run_dir / LOCK, "a test"), pytest.raises(InputError, match="another update-corpus"):
        update(run_dir, changes)
    assert snapshot(run_dir) == state
    assert update(run_dir, changes)["store_version"] == 1  # the lock went with its holder


def test_a_corrupt_index_slice_is_refused_not_extended(run_dir, tmp_path, capsys):
    slice_file = next((run_dir / "index").glob("v*/slice_000.npy"))
    data = bytearray(slice_file.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # same size, other bytes: only the checksum tells
    slice_file.write_bytes(bytes(data))
    state = snapshot(run_dir)
    changes = write_jsonl(tmp_path / "c.jsonl", [{"id": "n", "title": "N", "text": "New text here."}])
    assert launch.main(["update-corpus", f"run_dir={run_dir}", "threads=2", f"changes={changes}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slice_000.npy: checksum mismatch" in err[0]
    assert snapshot(run_dir) == state


def test_local_pretraining_refreshes_the_edited_pair(trained, run_dir, tmp_path):
    """The stop-the-world refresh re-embeds the current store version and tags it; gc spares the pair's index."""
    import json as _json

    from trainer.pretrain import pretrain

    victim = trained["corpus"][2]["id"]
    update(run_dir, write_jsonl(tmp_path / "c.jsonl", [{"id": victim, "delete": True}]))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={run_dir}", *TINY_MODEL, "cluster.backend=local", "retrieval.k=3", "masking.ner=regex",
        "pretrain.steps=2", "pretrain.batch_size=4", "refresh.every_steps=1", "pretrain.freeze_retriever_steps=0",
        "refresh.keep_versions=1"])
    pretrain(cfg)
    manifests = [_json.loads(p.read_text()) for p in sorted((run_dir / "index").glob("v*/manifest.json"))]
    refreshed = [m for m in manifests if m["checkpoint_step"] == 1]
    assert refreshed and all(m["store_version"] == 1 for m in refreshed)
    pinned = read_pointer(run_dir)["index"]
    assert (run_dir / "index" / pinned / "manifest.json").is_file()  # gc (keep 1) spared the pair's index


def test_a_prediction_moves_when_its_top_share_block_is_edited(trained, run_dir, tmp_path):
    """An answer that rests on one document's words: take them out of that document (they occur in no other)
    and, with the same model, it can no longer be given; its old top-share block is never shown again."""
    from trainer.qa_system import load_qa_system

    corpus = {d["id"]: d for d in trained["corpus"]}
    questions = [json.loads(line)["question"] for name in ("qa_eval", "qa_train")
                 for line in open(trained["data"][name])]

    def predict(qs):
        cfg = cfg_for(run_dir, "query", "finetune.k=3")
        system = load_qa_system(cfg, "auto")
        system.model.eval()
        return system, system.predict(qs, 3, cfg.finetune.max_answer_len)

    system, preds = predict(questions)
    picked = None
    for q, p in zip(questions, preds):
        word = p["prediction"].strip()
        holders = [d for d in corpus.values() if word and word in d["text"]]
        if len(word) >= 4 and len(holders) == 1 and holders[0]["id"] == system.run.store.doc_id(p["top_share_block"]):
            picked = q, p, word, holders[0]
            break
    assert picked, "no prediction rests on words found in one document only"
    q, p, word, doc = picked
    update(run_dir, write_jsonl(tmp_path / "c.jsonl", [{**doc, "text": doc["text"].replace(word, "Zyqwex")}]))
    system, (after,) = predict([q])
    assert after["prediction"].strip() != word
    assert p["top_share_block"] not in after["top_k"]  # the replaced block is dead
    store = system.run.store
    dead = set(store.dead.tolist())
    assert not any(word in store.text(b) for b in range(len(store)) if b not in dead)


def test_the_corpus_edit_benchmark_runs_and_matches_a_rebuild(trained, tmp_path):
    """bench/corpus_edits.py end to end on the small run: every step runs, EM figures are rates, and the
    edited index's top-k equals the full rebuild's for every probe question."""
    from bench.corpus_edits import main

    results = tmp_path / "RESULTS.md"
    rows = main(["--run-dir", str(trained["run"]), "--work", str(tmp_path / "w"),
                 "--corpus", str(trained["data"]["corpus"]), "--qa-eval", str(trained["data"]["qa_eval"]),
                 "--add", "3", "--edit", "2", "--delete", "2",
                 "--cost-fraction", "0.05", "--max-questions", "8", "--results", str(results), *LENGTHS])
    added = next(r for r in rows if r["step"] == "3 new people, after update-corpus")
    assert added["blocks_embedded"] == 3  # one block a person: only the added documents are embedded
    rebuilt = rows[-1]["same_top_k"]
    n_same, n_probe = map(int, rebuilt.split(" ")[0].split("/"))
    assert n_same == n_probe > 0
    assert all(0 <= r["exact_match"] <= 1 for r in rows if "exact_match" in r)
    assert "Corpus edits without retraining" in results.read_text()
