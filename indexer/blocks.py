"""Corpus -> block store: `[CLS] title [SEP] text [SEP]` blocks of at most `max_len` wordpieces.

Layout of a block store directory (written atomically, verified by manifest.json):
    blocks.arrow   Arrow IPC file: block_id int64, doc_id string, title string, text string,
                   token_ids list<int32>      (blocks of one document are contiguous)
    docs.arrow     doc_id string, first_block int64, num_blocks int32
    vocab.txt      the WordPiece vocabulary the token ids refer to
    bm25/          the live blocks' BM25 index (indexer/lexical.py: retrieval.mode bm25 | hybrid)
The Arrow files are memory-mapped on open, so any process reads block i in O(1) without
loading the corpus.

An edited store (indexer/corpus_versions.py, `launch.py update-corpus`) lists several block segments in
its manifest (`segments`: the previous version's files, hard-linked, then the appended rows) and
`dead.npy`, the ids of blocks whose document was replaced or deleted: ids stay row numbers and are
never reused. A store without these entries (every store `prepare` writes) is one segment, nothing dead.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from core.errors import InputError
from core.files import atomic_dir, verify_manifest, write_manifest
from core.parallel import chunked, ordered_map
from core.records import read_records, require_str
from indexer.lexical import BM25_COLUMNS, BM25_DIR, build_bm25
from indexer.tokenizer import Vocab, copy_vocab, load_tokenizer

BLOCK_SCHEMA = pa.schema([
    ("block_id", pa.int64()), ("doc_id", pa.string()), ("title", pa.string()),
    ("text", pa.string()), ("token_ids", pa.list_(pa.int32())),
])
DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("first_block", pa.int64()), ("num_blocks", pa.int32())])
ARROW_BATCH_ROWS = 1 << 16  # rows per record batch in every store file, however the rows arrived
DOC_CHUNK = 1024            # documents blocked at a time while building


@dataclass
class Document:
    doc_id: str
    title: str
    text: str


def iter_corpus(path: str | os.PathLike, max_doc_bytes: int) -> Iterator[Document]:
    """Validated documents, one at a time (the corpus is never held whole); any defect is an InputError naming
    file:line. Duplicate ids are found from an 8-byte hash of each id (DuplicateIds), checked once the corpus
    is read (so a duplicate fails after the last document; the caller's writes are atomic)."""
    ids = DuplicateIds()
    for where, row in read_records(path):
        doc = document_from_row(row, where, max_doc_bytes)
        ids.add(doc.doc_id)
        yield doc
    ids.check(path, max_doc_bytes)


def document_from_row(row: dict, where: str, max_doc_bytes: int) -> Document:
    """One corpus record (id, title, text) as a Document; a defect is an InputError naming `where`."""
    raw_id = row.get("id")
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        row = {**row, "id": str(raw_id)}  # integer ids are common enough to accept
    doc_id = require_str(row, "id", where)
    title = require_str(row, "title", where, allow_empty=True)
    text = require_str(row, "text", where)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_doc_bytes:
        raise InputError(f"{where}: document '{doc_id}' is {size} bytes, over data.max_doc_bytes={max_doc_bytes}")
    return Document(doc_id, title.strip(), text.strip())


class DuplicateIds:
    """Corpus ids seen, as 8-byte hashes (not a set of strings: 13M ids would take GBs). `check` finds a
    repeated hash, then reads the corpus again to name the repeat and its first place (a collision is not one)."""

    def __init__(self):
        self.hashes: list[np.ndarray] = []
        self.chunk: list[int] = []

    def add(self, doc_id: str) -> None:
        self.chunk.append(_id_hash(doc_id))
        if len(self.chunk) == DOC_CHUNK:
            self.hashes.append(np.asarray(self.chunk, np.uint64))
            self.chunk = []

    def check(self, path: str | os.PathLike, max_doc_bytes: int) -> None:
        seen = np.sort(np.concatenate(self.hashes + [np.asarray(self.chunk, np.uint64)]))
        if not len(seen):
            raise InputError(f"{path}: empty corpus (no documents)")
        repeated = set(seen[1:][seen[1:] == seen[:-1]].tolist())
        if not repeated:
            return
        first: dict[str, str] = {}
        for where, row in read_records(path):
            doc = document_from_row(row, where, max_doc_bytes)
            if _id_hash(doc.doc_id) in repeated:
                if doc.doc_id in first:
                    raise InputError(f"{where}: duplicate id '{doc.doc_id}' (first at {first[doc.doc_id]})")
                first[doc.doc_id] = where


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def read_corpus(path: str | os.PathLike, max_doc_bytes: int) -> list[Document]:
    """`iter_corpus` as a list: for corpora known to be small (tests, edits)."""
    return list(iter_corpus(path, max_doc_bytes))


def split_document(tok, vocab: Vocab, doc: Document, max_len: int, max_title_len: int
                   ) -> list[tuple[str, list[int]]]:
    """Split one document into (block_text, token_ids) pieces, each ≤ max_len wordpieces.

    Cuts fall on white space where possible, so no word (or its punctuation) is split across blocks.
    """
    title_ids = tok.encode(doc.title, add_special_tokens=False).ids[:max_title_len] if doc.title else []
    budget = max_len - 3 - len(title_ids)
    if budget < 8:
        raise InputError(f"blocks.max_len={max_len} leaves no room for text after a {len(title_ids)}-token title")
    enc = tok.encode(doc.text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    pieces = []
    start = 0
    while start < len(ids):
        end = min(start + budget, len(ids))
        if end < len(ids):
            cut = end
            while cut > start + 1 and offsets[cut][0] == offsets[cut - 1][1]:  # no space between
                cut -= 1
            if cut > start + 1:
                end = cut
        text = doc.text[offsets[start][0]:offsets[end - 1][1]]
        block = [vocab.cls] + title_ids + [vocab.sep] + ids[start:end] + [vocab.sep]
        pieces.append((text, block))
        start = end
    if not pieces:  # text had no wordpieces (e.g. only control characters)
        pieces.append(("", [vocab.cls] + title_ids + [vocab.sep, vocab.sep]))
    return pieces


def block_rows(tok, vocab: Vocab, docs: Iterable[Document], max_len: int, max_title_len: int, first_id: int = 0
               ) -> tuple[dict, dict]:
    """Block and doc columns (BLOCK_SCHEMA, DOC_SCHEMA) of `docs`, block ids counted from `first_id`: the one
    blocking of a corpus (prepare, a chunk at a time) and of the changed documents of an edit (update-corpus)."""
    cols = {k: [] for k in BLOCK_SCHEMA.names}
    doc_cols = {k: [] for k in DOC_SCHEMA.names}
    for doc in docs:
        pieces = split_document(tok, vocab, doc, max_len, max_title_len)
        doc_cols["doc_id"].append(doc.doc_id)
        doc_cols["first_block"].append(first_id + len(cols["block_id"]))
        doc_cols["num_blocks"].append(len(pieces))
        for text, ids in pieces:
            cols["block_id"].append(first_id + len(cols["block_id"]))
            cols["doc_id"].append(doc.doc_id)
            cols["title"].append(doc.title)
            cols["text"].append(text)
            cols["token_ids"].append(ids)
    return cols, doc_cols


class ArrowRowWriter:
    """Rows appended in chunks of any size, written as record batches of exactly `batch_rows` rows (the last may
    be shorter), each built afresh from the rows' values: the file's bytes depend only on its rows, never on
    how they were chunked on the way. Rows waiting for their batch are held as Arrow (4 bytes a token id, where
    Python lists cost ~36)."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int):
        self.schema, self.batch_rows = schema, batch_rows
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, schema)
        self.pending: list[pa.Table] = []
        self.pending_rows = self.rows = 0

    def append(self, cols: dict) -> None:
        chunk = pa.table({k: cols[k] for k in self.schema.names}, schema=self.schema)
        self.pending.append(chunk)
        self.pending_rows += chunk.num_rows
        self.rows += chunk.num_rows
        while self.pending_rows >= self.batch_rows:
            self._flush(self.batch_rows)

    def _flush(self, n: int) -> None:
        rows = pa.concat_tables(self.pending)
        # a fresh copy of the batch's values (take, not a slice): its buffers start at zero, whatever the chunks
        self.writer.write_table(rows.take(np.arange(n)).combine_chunks(), max_chunksize=n)
        rest = rows.slice(n)
        self.pending = [rest.take(np.arange(rest.num_rows))] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)
        self.writer.close()
        self.sink.close()


def read_batches(paths: list[Path], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Arrow files' record batches in order, `columns` only, read (not memory-mapped) one at a time: a scan
    of the whole store holds one batch, where a map would keep every page it touched resident."""
    for path in paths:
        with pa.OSFile(str(path)) as f:
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i).select(columns)


_BLOCKER: dict = {}  # a blocking worker's tokenizer and lengths (set by _init_blocker in each process)


def _init_blocker(vocab_file: str, max_len: int, max_title_len: int) -> None:
    tok = load_tokenizer(vocab_file)
    _BLOCKER.update(tok=tok, vocab=Vocab(tok), max_len=max_len, max_title_len=max_title_len)


def _block_chunk(docs: list[Document]) -> tuple[dict, dict]:
    """One chunk's block and doc columns, ids counted from 0 (the writer, in order, gives the real ones)."""
    w = _BLOCKER
    return block_rows(w["tok"], w["vocab"], docs, w["max_len"], w["max_title_len"])


BlockedChunks = Callable[[str], Iterable[tuple[dict, dict]]]  # vocab file -> (block cols, doc cols), in order


def build_block_store(corpus: str, out_dir: Path, vocab_spec: str, max_len: int, max_title_len: int,
                      max_doc_bytes: int, extra: dict | None = None, workers: int = 1,
                      blocked: BlockedChunks | None = None) -> dict:
    """corpus file -> block store at out_dir (atomic). Streams: documents are read, blocked (in `workers`
    processes, or by `blocked`: cluster/prepare_data.py's Ray Data pipeline) and written a chunk at a time, in
    order, so memory does not grow with the corpus (only 8 bytes an id, for duplicates, and the BM25 index,
    which is built from the written file). Deterministic: same input, same bytes, whatever blocks it."""
    if blocked is None:  # this machine: documents blocked in `workers` processes
        docs_in = iter_corpus(corpus, max_doc_bytes)
        head = next(docs_in)  # a missing or bad file fails here, before anything is written or drawn

        def blocked(vocab_file: str) -> Iterator[tuple[dict, dict]]:
            chunks = chunked(tqdm(itertools.chain([head], docs_in), desc="blocks", unit="doc", mininterval=2,
                                  disable=not sys.stderr.isatty()), DOC_CHUNK)
            return ordered_map(_block_chunk, chunks, workers, _init_blocker, (vocab_file, max_len, max_title_len))
    with atomic_dir(out_dir) as tmp:
        vocab_file = copy_vocab(vocab_spec, tmp)
        blocks = ArrowRowWriter(tmp / "blocks.arrow", BLOCK_SCHEMA, ARROW_BATCH_ROWS)
        docs = ArrowRowWriter(tmp / "docs.arrow", DOC_SCHEMA, ARROW_BATCH_ROWS)
        try:
            for cols, doc_cols in blocked(str(vocab_file)):
                first = blocks.rows
                cols["block_id"] = [first + b for b in cols["block_id"]]
                doc_cols["first_block"] = [first + b for b in doc_cols["first_block"]]
                blocks.append(cols)
                docs.append(doc_cols)
        finally:
            blocks.close()
            docs.close()
        # versioned with the blocks: inside the store
        build_bm25(read_batches([tmp / "blocks.arrow"], BM25_COLUMNS), np.empty(0, np.int64), tmp / BM25_DIR)
        # max_title_len is recorded so that an edit blocks its documents exactly as these were blocked
        meta = {"kind": "block_store", "num_blocks": blocks.rows, "num_docs": docs.rows,
                "max_len": max_len, "max_title_len": max_title_len, "corpus": str(corpus), **(extra or {})}
        write_manifest(tmp, meta)
    return meta


def write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=ARROW_BATCH_ROWS)


class BlockStore:
    """Read-only, memory-mapped view of a block store directory."""

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        self.dir = Path(directory)
        if not (self.dir / "manifest.json").is_file():
            raise InputError(f"{self.dir}: no block store here (run `launch.py prepare` first)")
        self.manifest = verify_manifest(self.dir, check_hashes=verify)
        self.version = int(self.manifest.get("store_version", 0))  # 0: the store `prepare` wrote
        segments = self.manifest.get("segments", ["blocks.arrow"])
        try:
            # memory-mapped segments concatenated without a copy; their block ids are consecutive
            self.table = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(self.dir / seg))).read_all()
                                           for seg in segments])
            docs = pa.ipc.open_file(pa.memory_map(str(self.dir / "docs.arrow"))).read_all()
        except pa.ArrowInvalid as e:
            raise InputError(f"{self.dir}: corrupt block store: {e}") from None
        dead_file = self.dir / "dead.npy"
        # ids of blocks of replaced or deleted documents: never searched, never shown
        self.dead = np.load(dead_file) if dead_file.is_file() else np.empty(0, np.int64)
        # Per record batch, zero-copy views of the token lists' offsets and values: opening a store reads nothing
        # of it, and a block's tokens are paged in when it is read (no copy of the corpus's tokens per process).
        chunks = self.table.column("token_ids").chunks
        self._chunk_start = np.cumsum([0] + [len(c) for c in chunks])
        self._chunks = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in chunks]
        self._docs = docs  # memory-mapped too: doc ids become Python strings only when a lookup asks for them
        self._doc_table: tuple[list[str], np.ndarray, np.ndarray] | None = None
        self._doc_index: dict[str, int] | None = None
        self._doc_starts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.vocab_file = self.dir / "vocab.txt"
        self.bm25_dir = self.dir / BM25_DIR

    def __len__(self) -> int:
        return self.table.num_rows

    def tokens(self, block_id: int) -> np.ndarray:
        """int32 token ids of one block, `[CLS] title [SEP] text [SEP]` (a zero-copy view)."""
        if not 0 <= block_id < len(self):
            raise IndexError(f"block {block_id} of {len(self)}")
        c = int(np.searchsorted(self._chunk_start, block_id, side="right")) - 1
        offsets, values = self._chunks[c]
        i = block_id - int(self._chunk_start[c])
        return values[offsets[i]:offsets[i + 1]]

    def iter_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """Every block in order, a record batch at a time (read_batches: for scans, not lookups)."""
        return read_batches([self.dir / seg for seg in self.manifest.get("segments", ["blocks.arrow"])], columns)

    def text(self, block_id: int) -> str:
        return self.table.column("text")[block_id].as_py()

    def title(self, block_id: int) -> str:
        return self.table.column("title")[block_id].as_py()

    def doc_id(self, block_id: int) -> str:
        return self.table.column("doc_id")[block_id].as_py()

    @property
    def num_live(self) -> int:
        return len(self) - len(self.dead)

    def _doc_columns(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """docs.arrow's columns, read on the first lookup (prepare's examples, edits), not on open."""
        if self._doc_table is None:
            d = self._docs
            self._doc_table = (d.column("doc_id").to_pylist(), d.column("first_block").to_numpy(),
                               d.column("num_blocks").to_numpy())
        return self._doc_table

    @property
    def num_docs(self) -> int:
        """Live documents (docs.arrow's rows)."""
        return self._docs.num_rows

    def doc_index(self, block_id: int) -> int:
        """The row in docs.arrow (store order) of the document holding `block_id`, -1 if none does (a dead
        block). Reads only the documents' first-block and count columns (12 bytes a document)."""
        if self._doc_starts is None:
            first = self._docs.column("first_block").to_numpy()
            order = np.argsort(first, kind="stable")
            self._doc_starts = (first[order], self._docs.column("num_blocks").to_numpy()[order], order)
        first, count, order = self._doc_starts
        i = int(np.searchsorted(first, block_id, side="right")) - 1
        return int(order[i]) if i >= 0 and block_id < first[i] + count[i] else -1

    @property
    def doc_ids(self) -> list[str]:
        """The live documents' ids, in store order."""
        return list(self._doc_columns()[0])

    def doc_entries(self) -> list[tuple[str, int, int]]:
        """(doc_id, first_block, num_blocks) of each live document, in store order (docs.arrow)."""
        return [(d, int(f), int(n)) for d, f, n in zip(*self._doc_columns())]

    def doc_blocks(self, doc_id: str) -> range:
        """Block ids of a document (an empty range if the id is unknown)."""
        ids, first, count = self._doc_columns()
        if self._doc_index is None:
            self._doc_index = {d: i for i, d in enumerate(ids)}
        i = self._doc_index.get(doc_id)
        if i is None:
            return range(0)
        return range(int(first[i]), int(first[i] + count[i]))
