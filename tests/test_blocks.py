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
