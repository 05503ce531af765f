"""prepare.engine=ray: the corpus blocked and its sentences tagged on Ray Data (a real local Ray), the same
bytes as the local engine, and the same one-line errors."""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.config import load_config
from core.errors import InputError
from tests.conftest import ROOT, write_jsonl

FILES = ("blocks/blocks.arrow", "blocks/docs.arrow", "examples/train.parquet", "examples/eval.parquet")


def _prepare(tmp_path, name, corpus, engine, *overrides):
    from cluster.prepare_data import prepare_on_ray
    from trainer.prepare import prepare

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / name}", f"data.corpus={corpus}", "data.pretrain=", "data.eval=",
        f"prepare.engine={engine}", "prepare.workers=2", *overrides])
    summary = prepare_on_ray(cfg) if engine == "ray" else prepare(cfg)
    digests = {f: hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest() for f in FILES}
    return summary, digests


def test_ray_data_writes_the_local_engines_bytes(tmp_path, tiny_corpus, local_ray, monkeypatch):
    """JSONL (with a blank line, so places are lines, not rows) and a directory of Parquet files: the block
    store and the examples (spaCy spans, a document split) are byte for byte the local engine's. Small batches,
    so both actors work and the driver stitches many batches."""
    import indexer.blocks as B
    import trainer.data as D

    monkeypatch.setattr(B, "DOC_CHUNK", 7)
    monkeypatch.setattr(D, "SENTENCE_BLOCK_CHUNK", 5)  # both engines: the blocks split and tagged at a time
    lines = open(tiny_corpus["corpus"]).read().splitlines()
    jsonl = write_jsonl(tmp_path / "c.jsonl", lines[:20] + [""] + lines[20:])
    parts = tmp_path / "parts"
    parts.mkdir()
    rows = [json.loads(x) for x in lines]
    for i in range(0, len(rows), 15):  # names sort in corpus order
        pq.write_table(pa.Table.from_pylist(rows[i:i + 15]), parts / f"part-{i:03d}.parquet")
    split = ("masking.ner=spacy", "data.eval_split=documents", "data.eval_fraction=0.2")
    for corpus in (jsonl, parts):
        local, local_digests = _prepare(tmp_path, f"local-{corpus.name}", corpus, "local", *split)
        on_ray, ray_digests = _prepare(tmp_path, f"ray-{corpus.name}", corpus, "ray", *split)
        assert local["num_docs"] == 40 and local["train_examples"] > 50
        assert on_ray == {**local}
        assert ray_digests == local_digests


@pytest.mark.parametrize("bad, message", [
    ('{"id": "a", "title": "t", "text": "x y"}\n\n{"id": "b", "title": "t"', r"c\.jsonl:3: malformed JSON"),
    ('{"id": "a", "title": "t", "text": "x y"}\n{"id": "b", "text": "z"}', r"c\.jsonl:2: missing field 'title'"),
    ('{"id": "a", "title": "t", "text": "x y"}\n{"id": "a", "title": "t", "text": "z"}',
     r"c\.jsonl:2: duplicate id 'a' \(first at .*c\.jsonl:1\)"),
])
def test_ray_data_names_a_bad_rows_line_as_the_local_engine_does(tmp_path, local_ray, bad, message):
    (tmp_path / "c.jsonl").write_text(bad + "\n")
    for engine in ("local", "ray"):
        with pytest.raises(InputError, match=message):
            _prepare(tmp_path, engine, tmp_path / "c.jsonl", engine, "masking.ner=regex")
        assert not (tmp_path / engine / "blocks").exists()  # nothing half-written


def test_ray_engine_is_a_checked_choice():
    with pytest.raises(InputError, match="'prepare.engine'"):
        load_config(ROOT / "configs" / "tiny.yaml", ["prepare.engine=spark"])
