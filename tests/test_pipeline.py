"""The command chain prepare -> ict -> pretrain -> evaluate on a random tiny BERT (fast)."""
import json

import numpy as np
import pytest
import torch

from core.errors import InputError
from indexer.versions import IndexVersions
from trainer.checkpoint import load_model, save_model
from trainer.evaluate import evaluate
from trainer.ict import ict
from trainer.index_client import refresh_index, retrieve
from trainer.model_init import fresh_model
from trainer.prepare import prepare
from trainer.pretrain import pretrain, sample_queries
from trainer.run import Run


def test_commands_chain_through_the_run_directory(tiny_cfg):
    cfg = tiny_cfg("ict.steps=3", "pretrain.steps=4", "refresh.every_steps=2", "pretrain.log_every=1",
                   "data.max_eval_examples=12")
    summary = prepare(cfg)
    assert summary["num_docs"] == 40 and summary["train_examples"] > 0
    ict(cfg)
    pretrain(cfg)
    metrics = evaluate(cfg)
    run = cfg.run_dir
    assert json.loads(open(f"{run}/metrics.json").read()) == metrics
    assert metrics["n"] == 12 and metrics["k"] == 3
    for key in ("mlm_accuracy", "mlm_accuracy_no_retrieval", "retrieval_recall_at_k"):
        assert 0.0 <= metrics[key] <= 1.0
    # ICT published v1, which pretraining reused at step 0 (same doc encoder); it re-embedded at
    # step 2; evaluate reused none of them (the final model differs) and published its own.
    versions = IndexVersions(f"{run}/index")
    assert versions.current().version == 3 and len(versions.versions()) == cfg.refresh.keep_versions
    events = [json.loads(line) for line in open(f"{run}/events.jsonl")]
    steps = [e for e in events if e["job"] == "pretrain"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["index_version"] for e in steps] == [1, 1, 2, 2]
    assert [e["staleness"] for e in steps] == [1, 2, 1, 2]
    assert metrics["index_version"] == 3
    # a second evaluate finds the index built by this very model and does not re-embed
    assert evaluate(cfg)["index_version"] == 3


def test_evaluate_scores_the_file_it_is_given(tiny_cfg, tiny_corpus, tmp_path):
    lines = open(tiny_corpus["eval"]).read().splitlines()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("\n".join(lines[:5]) + "\n")
    second.write_text("\n".join(lines[5:14]) + "\n")
    cfg = tiny_cfg("ict.steps=2")
    prepare(cfg)
    ict(cfg)
    a = evaluate(tiny_cfg(f"data.eval={first}"))
    b = evaluate(tiny_cfg(f"data.eval={second}"))
    held_out = evaluate(tiny_cfg("data.eval=", "data.max_eval_examples=20"))
    assert (a["n"], a["eval_file"]) == (5, str(first)) and (b["n"], b["eval_file"]) == (9, str(second))
    assert held_out["n"] == 20 and held_out["eval_file"].endswith("examples/eval.parquet")
    with pytest.raises(InputError, match="missing.jsonl: file not found"):
        evaluate(tiny_cfg(f"data.eval={tmp_path / 'missing.jsonl'}"))


def test_no_refresh_while_the_retriever_is_frozen(tiny_cfg):
    # Frozen for 3 steps, the doc tower is still ICT's: the refresh due at step 2 would re-embed the corpus
    # with the same weights, so it is skipped and the ICT index counts as fresh until step 3.
    overrides = ("ict.steps=2", "pretrain.steps=6", "refresh.every_steps=2", "pretrain.log_every=1",
                 "pretrain.freeze_retriever_steps=3")
    cfg = tiny_cfg(*overrides, "model.reader_head=mlm")
    prepare(cfg)
    ict(cfg)
    # pre-training with the copy head starts from an ICT checkpoint written with the MLM head alone
    cfg = tiny_cfg(*overrides, "model.reader_head=copy")
    pretrain(cfg)
    assert load_model(f"{cfg.run_dir}/models/ict")[0].reader.head == "mlm"
    assert load_model(f"{cfg.run_dir}/models/realm")[0].reader.head == "copy"
    steps = [e for e in map(json.loads, open(f"{cfg.run_dir}/events.jsonl")) if e["job"] == "pretrain"]
    assert [e["index_version"] for e in steps] == [1, 1, 1, 1, 2, 2]
    assert [e["staleness"] for e in steps] == [0, 0, 0, 1, 1, 2]
    assert IndexVersions(f"{cfg.run_dir}/index").current().checkpoint_step == 4


def test_a_frozen_group_warms_up_when_it_thaws():
    from trainer.engine import lr_lambdas

    reader, retriever = lr_lambdas([{"params": []}, {"params": [], "frozen_steps": 100}], 140, 20)
    assert retriever(0) == retriever(99) == 0.0
    assert retriever(100) == reader(0) == 1 / 20  # its first step starts its warmup
    assert retriever(119) == 1.0 == max(map(retriever, range(140)))  # the full lr, not a third of it
    assert retriever(139) > 0 and retriever(140) == reader(140) == 0.0  # and it decays to the run's end


def test_own_block_steps_read_the_own_block_then_exclude_it(tiny_corpus, tiny_cfg):
    from trainer.data import own_blocks, read_examples, span_in_candidates

    cfg = tiny_cfg("data.pretrain=", "data.eval=", "masking.ner=regex", "pretrain.steps=3", "pretrain.log_every=1",
                   "pretrain.freeze_retriever_steps=2", "pretrain.own_block_steps=2")
    prepare(cfg)
    pretrain(cfg)
    steps = [e for e in map(json.loads, open(f"{cfg.run_dir}/events.jsonl")) if e["job"] == "pretrain"]
    assert [e["span_in_topk"] for e in steps[:2]] == [1.0, 1.0]
    run = Run.open(cfg)
    train = read_examples(f"{cfg.run_dir}/examples/train.parquet")
    queries = sample_queries(train, run, 8, np.random.default_rng(0))
    own = own_blocks(queries)
    assert own.tolist() == [[q.exclude_blocks[0]] for q in queries]
    # the masked tokens are always in the own block (the sentence came from it); the metric sees them
    assert span_in_candidates(queries, own, run.store) == 1.0
    assert span_in_candidates(queries, np.full_like(own, -1), run.store) == 0.0
    # a query without an own block (user text without source_id) reads the null document alone
    queries[0].exclude_blocks = []
    assert own_blocks(queries)[0].tolist() == [-1]


@pytest.mark.parametrize("reader_head, copy_layer", [("mlm", 0), ("copy", 0), ("copy", 1)])
def test_checkpoint_round_trip_and_refusal_of_damaged_files(tmp_path, reader_head, copy_layer):
    from trainer.bert import bert_factory
    from trainer.model import build_realm

    torch.manual_seed(0)
    model = build_realm(bert_factory("random", 30522, 32, 2, 64), 2, 2, 16, reader_head=reader_head,
                        copy_layer=copy_layer, copy_init="identity" if copy_layer else "random")
    save_model(model, tmp_path / "m", step=7)
    loaded, meta = load_model(tmp_path / "m")
    assert meta["step"] == 7 and loaded.reader.head == reader_head
    assert (loaded.reader.copy_layer, loaded.reader.copy_init) == (model.reader.copy_layer, model.reader.copy_init)
    assert len(model.state_dict()) == len(loaded.state_dict())
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # pre-training keeps the head of a checkpoint set up as configured and replaces one set up otherwise
    head = loaded.reader.copy_head
    loaded.reader.use_head(reader_head, copy_layer, loaded.reader.copy_init)
    assert loaded.reader.copy_head is head
    if reader_head == "copy":
        loaded.reader.use_head("copy", 1 - copy_layer, "random")
        assert loaded.reader.copy_head is not head and loaded.reader.copy_layer == 1 - copy_layer
    heads = tmp_path / "m" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:-10])
    with pytest.raises(InputError, match="heads.safetensors: truncated or changed"):
        load_model(tmp_path / "m")
    with pytest.raises(InputError, match="checkpoint not found"):
        load_model(tmp_path / "missing")


def test_k_larger_than_corpus_is_refused(tiny_cfg):
    cfg = tiny_cfg("retrieval.k=100000")
    prepare(cfg)
    with pytest.raises(InputError, match="'retrieval.k': k=100000 is larger than the corpus"):
        pretrain(cfg)


def test_corpus_sentences_exclude_their_own_block(tiny_corpus, tiny_cfg):
    cfg = tiny_cfg("data.pretrain=", "data.eval=", "masking.ner=regex")
    prepare(cfg)
    from trainer.data import read_examples

    train = read_examples(f"{cfg.run_dir}/examples/train.parquet")
    assert train and all(len(ex.exclude_blocks) == 1 and not ex.gold_blocks for ex in train)
    run = Run.open(cfg)
    assert all(ex.text in run.store.text(ex.exclude_blocks[0]) for ex in train[:50])
    rng = np.random.default_rng(0)
    model = fresh_model(cfg, run.vocab.size).eval()
    index = refresh_index(run, model, 0, "x")
    queries = sample_queries(train, run, 16, rng)
    cand = retrieve(model, index, run, queries, cfg.retrieval.k)
    for q, row in zip(queries, cand):
        assert q.exclude_blocks[0] not in row.tolist()


def test_documents_held_out_whole_and_another_retriever_for_the_same_reader(tiny_cfg):
    """data.eval_split=documents: no evaluation sentence's article is trained on; eval.retriever=ict scores the
    pre-trained reader over ICT's candidates (its own index), and span_in_top_k follows the candidates."""
    from trainer.data import read_examples

    cfg = tiny_cfg("data.pretrain=", "data.eval=", "masking.ner=regex", "data.eval_split=documents",
                   "data.eval_fraction=0.2", "ict.steps=2", "pretrain.steps=2", "refresh.every_steps=1")
    prepare(cfg)
    run = Run.open(cfg)
    docs = {split: {run.store.doc_id(ex.exclude_blocks[0])
                    for ex in read_examples(f"{cfg.run_dir}/examples/{split}.parquet")} for split in ("train", "eval")}
    assert docs["eval"] and not docs["eval"] & docs["train"]
    assert len(docs["eval"]) <= round(0.2 * len(run.store.doc_ids))
    ict(cfg)
    pretrain(cfg)
    own = evaluate(tiny_cfg("eval.model=realm", "data.eval="))
    swapped = evaluate(tiny_cfg("eval.model=realm", "data.eval=", "eval.retriever=ict"))
    ict_only = evaluate(tiny_cfg("eval.model=ict", "data.eval="))
    assert own["retriever"].endswith("models/realm") and swapped["retriever"].endswith("models/ict")
    assert swapped["model"] == own["model"] and swapped["n"] == own["n"]
    # the same candidates as the ICT model's own evaluation: the ICT retriever over the ICT index
    assert swapped["index_version"] == ict_only["index_version"] != own["index_version"]
    assert swapped["span_in_top_k"] == ict_only["span_in_top_k"]
    for m in (own, swapped):
        assert 0.0 <= m["span_in_top_k"] <= 1.0
        # accuracy splits into where the span was retrieved and where it was not, weighted by how often
        parts = [(m["span_in_top_k"], m["mlm_accuracy_span_in_top_k"]),
                 (1 - m["span_in_top_k"], m["mlm_accuracy_span_not_in_top_k"])]
        assert m["mlm_accuracy"] == pytest.approx(sum(w * a for w, a in parts if a is not None))
    with pytest.raises(InputError, match="'eval.retriever': read by task=mlm only"):
        evaluate(tiny_cfg("task=openqa", "eval.retriever=ict"))


def test_a_document_split_needs_no_given_eval_file(tiny_cfg):
    with pytest.raises(InputError, match="'data.eval_split'"):
        prepare(tiny_cfg("data.eval_split=documents"))  # tiny_cfg gives data.eval


def test_prepare_with_two_workers_writes_the_same_bytes(tmp_path, tiny_corpus, monkeypatch):
    """prepare.workers processes block the corpus and tag its sentences (spaCy) chunk by chunk, in order: the
    block store and the examples are byte for byte those of one process (small chunks, so both workers work)."""
    import hashlib

    import indexer.blocks as B
    import trainer.data as D
    from cluster.config import load_config
    from tests.conftest import ROOT

    monkeypatch.setattr(B, "DOC_CHUNK", 7)
    monkeypatch.setattr(D, "SENTENCE_BLOCK_CHUNK", 5)  # chunks are cut in this process; the workers split and tag
    digests = {}
    for workers in (1, 2):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            f"run_dir={tmp_path / str(workers)}", f"data.corpus={tiny_corpus['corpus']}", "data.pretrain=",
            "data.eval=", "masking.ner=spacy", f"prepare.workers={workers}"])
        summary = prepare(cfg)
        digests[workers] = {f: hashlib.sha256((tmp_path / str(workers) / f).read_bytes()).hexdigest()
                            for f in ("blocks/blocks.arrow", "blocks/docs.arrow", "examples/train.parquet",
                                      "examples/eval.parquet")}
        assert summary["train_examples"] > 50
    assert digests[1] == digests[2]


def test_examples_are_drawn_from_a_memory_mapped_copy_equal_to_the_parquet_file(tiny_cfg):
    """The trainer's ExampleTable gives example i as read_examples's list does, from a memory-mapped Arrow copy
    written once beside the Parquet file and rewritten when that file changes."""
    import os

    from trainer.data import ExampleTable, read_examples, write_examples

    cfg = tiny_cfg()
    prepare(cfg)
    path = f"{cfg.run_dir}/examples/train.parquet"
    listed, table = read_examples(path), ExampleTable(path)
    assert len(table) == len(listed) > 0
    assert [table[i] for i in range(len(table))] == listed and table[-1] == listed[-1]
    arrow = f"{cfg.run_dir}/examples/train.arrow"
    mtime = os.stat(arrow).st_mtime_ns
    assert ExampleTable(path).table.num_rows == len(listed) and os.stat(arrow).st_mtime_ns == mtime  # reused
    write_examples(Run.open(cfg).dir / "examples", {"train": listed[:3], "eval": listed[3:5]})
    assert [ExampleTable(path)[i] for i in range(3)] == listed[:3] and len(ExampleTable(path)) == 3
    with pytest.raises(IndexError):
        table[len(table)]
