import hashlib

import numpy as np
import pytest

from core.errors import InputError
from indexer.blocks import BlockStore, Document, build_block_store, split_document
from indexer.tokenizer import Vocab, load_tokenizer, resolve_vocab
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_vocab("minilm"))


def test_long_document_is_split_into_blocks_within_the_length_bound(tok):
    vocab = Vocab(tok)
    text = " ".join(f"Sentence number {i} talks about the river Thames and London." for i in range(200))
    pieces = split_document(tok, vocab, Document("d", "River Thames", text), max_len=64, max_title_len=8)
    assert len(pieces) > 10
    title = tok.encode("River Thames", add_special_tokens=False).ids
    for block_text, ids in pieces:
        assert len(ids) <= 64
        assert ids[0] == vocab.cls and ids[-1] == vocab.sep
        assert ids[1:1 + len(title)] == title and ids[1 + len(title)] == vocab.sep
        assert block_text and block_text in text
    # every word of the document lands in exactly one block, in order
    assert " ".join(t for t, _ in pieces).split() == text.split()


def test_split_never_cuts_inside_a_word(tok):
    vocab = Vocab(tok)
    text = " ".join(["antidisestablishmentarianism"] * 100)
    for block_text, _ in split_document(tok, vocab, Document("d", "", text), 40, 8):
        assert set(block_text.split()) == {"antidisestablishmentarianism"}


def test_block_store_is_deterministic_and_readable_by_id(tmp_path):
    rows = [{"id": f"d{i}", "title": f"Title {i}", "text": "Alpha beta gamma. " * (i * 40 + 1)} for i in range(5)]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    digests = []
    for name in ("a", "b"):
        build_block_store(str(corpus), tmp_path / name, "minilm", 64, 8, 10**7)
        digests.append(hashlib.sha256((tmp_path / name / "blocks.arrow").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    store = BlockStore(tmp_path / "a", verify=True)
    assert len(store) > 5
    for doc in ("d0", "d3"):
        blocks = store.doc_blocks(doc)
        assert len(blocks) >= 1 and all(store.doc_id(b) == doc for b in blocks)
    assert store.tokens(len(store) - 1).dtype == np.int32
    assert store.doc_blocks("nope") == range(0)


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "title": "t", "text": "ok"}\n{"id": "b", "title": "t", "text": ', "c.jsonl:2: malformed JSON"),
    ('{"id": "a", "title": "t"}', "c.jsonl:1: missing field 'text'"),
    ('{"id": "a", "title": "t", "text": "   "}', "c.jsonl:1: field 'text' is empty"),
    ('{"id": "a", "title": "t", "text": 5}', "c.jsonl:1: field 'text' must be a string"),
    ('{"id": "a", "title": "t", "text": "x"}\n{"id": "a", "title": "t", "text": "y"}', "c.jsonl:2: duplicate id 'a'"),
    ('', "empty corpus"),
])
def test_bad_corpus_lines_are_named_by_file_and_line(tmp_path, line, message):
    (tmp_path / "c.jsonl").write_text(line)
    with pytest.raises(InputError, match=message):
        build_block_store(str(tmp_path / "c.jsonl"), tmp_path / "blocks", "minilm", 64, 8, 10**7)
    assert not (tmp_path / "blocks").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'{"id": "a", "title": "t", "text": "ok"}\n{"id": "b", "text": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=r"c.jsonl:2: not valid UTF-8"):
        build_block_store(str(tmp_path / "c.jsonl"), tmp_path / "blocks", "minilm", 64, 8, 10**7)


def test_oversized_document_is_refused(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"id": "big", "title": "", "text": "word " * 5000}])
    with pytest.raises(InputError, match="c.jsonl:1: document 'big' is 25000 bytes"):
        build_block_store(str(tmp_path / "c.jsonl"), tmp_path / "blocks", "minilm", 64, 8, 10_000)


def test_embeddings_come_back_in_block_order_whatever_the_length_batching(tmp_path):
    import torch

    from indexer.embed import embed_blocks, encode_blocks, pad_batch
    from trainer.bert import bert_factory
    from trainer.model import build_realm

    rows = [{"id": f"d{i}", "title": f"T{i}", "text": "word " * (7 * i % 50 + 3)} for i in range(12)]
    build_block_store(str(write_jsonl(tmp_path / "c.jsonl", rows)), tmp_path / "s", "minilm", 64, 8, 10**7)
    store = BlockStore(tmp_path / "s")
    torch.manual_seed(0)
    tower = build_realm(bert_factory("random", 30522, 32, 2, 64), 1, 1, 16).retriever.doc_tower.eval()
    with torch.no_grad():
        alone = torch.cat([tower(*pad_batch([store.tokens(b)])) for b in range(len(store))]).numpy()
    np.testing.assert_allclose(embed_blocks(tower, store, batch_size=5, progress=False), alone, atol=1e-5)
    np.testing.assert_allclose(embed_blocks(tower, store, 3, 9, batch_size=4, progress=False), alone[3:9], atol=1e-5)
    ids = np.array([7, 0, 11, 4])
    np.testing.assert_allclose(encode_blocks(tower, store, ids, batch_size=3), alone[ids], atol=1e-5)


def test_the_store_streams_in_record_batches_and_its_bytes_do_not_depend_on_the_chunking(tmp_path, monkeypatch):
    """Documents are blocked a chunk at a time and written in record batches of a fixed row count: a block's
    tokens read back the same across batch boundaries, and the chunk size never changes a byte."""
    import indexer.blocks as B

    rows = [{"id": f"d{i}", "title": f"T{i}", "text": "Alpha beta gamma delta. " * (i % 7 * 9 + 1)} for i in range(40)]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    build_block_store(str(corpus), tmp_path / "one", "minilm", 32, 8, 10**7)  # one batch (65,536 rows)
    monkeypatch.setattr(B, "ARROW_BATCH_ROWS", 7)
    digests = []
    for chunk in (3, 1000):
        monkeypatch.setattr(B, "DOC_CHUNK", chunk)
        build_block_store(str(corpus), tmp_path / f"chunk{chunk}", "minilm", 32, 8, 10**7)
        digests.append([hashlib.sha256((tmp_path / f"chunk{chunk}" / f).read_bytes()).hexdigest()
                        for f in ("blocks.arrow", "docs.arrow")])
    assert digests[0] == digests[1]
    one, many = BlockStore(tmp_path / "one"), BlockStore(tmp_path / "chunk3", verify=True)
    assert len(many.table.column("token_ids").chunks) == -(-len(many) // 7) > 1
    assert len(one) == len(many) > 40
    for b in range(len(one)):
        np.testing.assert_array_equal(one.tokens(b), many.tokens(b))
        assert one.text(b) == many.text(b) and one.doc_id(b) == many.doc_id(b)
    assert [list(many.doc_blocks(f"d{i}")) for i in range(40)] == [list(one.doc_blocks(f"d{i}")) for i in range(40)]
    with pytest.raises(IndexError):
        many.tokens(len(many))


def test_a_directory_of_parquet_files_is_one_corpus_read_in_name_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"d{i}", "title": f"T{i}", "text": f"Document number {i} is here."} for i in range(9)]
    parts = tmp_path / "parts"
    parts.mkdir()
    for n, lo in enumerate((0, 4, 7)):
        pq.write_table(pa.Table.from_pylist(rows[lo:lo + (4 if lo == 0 else 3)]), parts / f"part-{n:03d}.parquet")
    build_block_store(str(parts), tmp_path / "from_dir", "minilm", 64, 8, 10**7)
    build_block_store(str(write_jsonl(tmp_path / "c.jsonl", rows)), tmp_path / "from_jsonl", "minilm", 64, 8, 10**7)
    for f in ("blocks.arrow", "docs.arrow"):
        assert (tmp_path / "from_dir" / f).read_bytes() == (tmp_path / "from_jsonl" / f).read_bytes()
    pq.write_table(pa.Table.from_pylist([{"id": "d0", "title": "again", "text": "dup"}]), parts / "part-999.parquet")
    with pytest.raises(InputError, match=r"part-999.parquet:row 0: duplicate id .d0. \(first at .*part-000"):
        build_block_store(str(parts), tmp_path / "dup", "minilm", 64, 8, 10**7)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .parquet files"):
        build_block_store(str(empty), tmp_path / "none", "minilm", 64, 8, 10**7)
