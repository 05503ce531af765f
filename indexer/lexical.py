"""Lexical retrieval: a BM25 index of a block store (bm25s).

The BM25 index lives inside the block store it indexes (`<store>/bm25/`), written in the same atomic
directory before the store's manifest, so it is versioned with the blocks for free: `prepare`,
`reindex` and every `update-corpus` store version carry their own, and a reader that opens a store
opens its index. It holds the live blocks only (an edited store's dead blocks are never indexed), each
as its title and text, lower-cased, English stop words removed; `block_ids.npy` maps its rows to
block ids.

bm25s (sparse-matrix BM25, Lucene's scoring, k1 = 1.5, b = 0.75) rather than our own: it is
maintained, memory-maps its index on load and scores a query with one sparse row slice. Only the build
is ours (build_bm25): bm25s's `index` holds every block's terms and a coordinate copy of the matrix at
once, ~9x the index, where ours streams to the same files, byte for byte.

Fusing its ranking with the dense model's (`retrieval.mode: hybrid`) is indexer/fusion.py's.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.errors import InputError

log = logging.getLogger(__name__)

BM25_DIR = "bm25"
BLOCK_IDS = "block_ids.npy"
STOPWORDS = "en"
CHUNK_ROWS = 16_384  # blocks tokenized, and scored, at a time while building: one chunk's texts are in memory
BM25_COLUMNS = ["block_id", "title", "text"]  # what build_bm25 reads of the blocks


def block_texts(batches: Iterable[pa.RecordBatch], dead: np.ndarray) -> Iterator[tuple[int, str]]:
    """(block id, "title text") of each live block, from record batches of BM25_COLUMNS."""
    dead_set = set(int(d) for d in dead)
    for batch in batches:
        ids, titles, texts = (batch.column(c).to_pylist() for c in BM25_COLUMNS)
        for b, title, text in zip(ids, titles, texts):
            if b not in dead_set:
                yield b, f"{title} {text}"


def terms(texts: list[str]) -> list[list[str]]:
    """bm25s's tokenization (lower-cased words of 2+ characters, stop words removed), for blocks and queries."""
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def bm25_scores(tf: np.ndarray, doc_len: np.ndarray, avg_len: float, idf: np.ndarray, k1: float, b: float
                ) -> np.ndarray:
    """Lucene BM25 of (block, term) pairs as bm25s computes it, to the bit: idf rounded to float32 times
    tf / (k1 (1 - b + b l_d / l_avg) + tf) in float64, stored as float32."""
    norm = k1 * ((1 - b) + b * doc_len.astype(np.float64) / avg_len)
    tf = tf.astype(np.float64)
    return (idf.astype(np.float64) * (tf / (norm + tf))).astype(np.float32)


def term_pairs(terms_flat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (term, block) pairs of blocks [0, len(offsets) - 1), `terms_flat[offsets[i]:offsets[i + 1]]`
    block i's term ids: term, local block and count of each, sorted by term, then block."""
    n_blocks = len(offsets) - 1
    block = np.repeat(np.arange(n_blocks, dtype=np.int64), np.diff(offsets))
    keys, tf = np.unique(terms_flat.astype(np.int64) * n_blocks + block, return_counts=True)
    return keys // n_blocks, keys % n_blocks, tf


def build_bm25(batches: Iterable[pa.RecordBatch], dead: np.ndarray, out_dir: Path) -> dict:
    """Index the live blocks of `batches` (BM25_COLUMNS of every block, in order) into `out_dir` (called inside
    the store's atomic directory), in bm25s's format, without holding the index or the corpus in memory.

    bm25s's own `index` builds from every block's term list at once and then converts a coordinate
    matrix, about 9x the index's size in memory (1.1 GB for a 127 MB index at a million blocks). Here:
      1. blocks are tokenized CHUNK_ROWS at a time; their term ids go to a scratch file, 4 bytes a term, and
         each term's blocks are counted (its column's length in the CSC matrix);
      2. a pass over that file scores each chunk's (term, block) pairs and writes them into their columns of
         the memory-mapped .npy files, each column filling in block order.
    Memory is the vocabulary, a few numbers a term and a block, and one chunk. The files load as bm25s's
    (LexicalIndex: BM25.load), equal to what bm25s's `index` writes (tests/test_retrieval_modes.py)."""
    import bm25s

    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / "terms.tmp"
    vocab: dict[str, int] = {}  # term -> id in order of first appearance: the same corpus, the same bytes
    ids: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    chunk_ids: list[int] = []
    chunk: list[str] = []
    df = np.zeros(0, np.int64)  # blocks holding each term so far: its column's length
    try:
        with scratch.open("wb") as f:
            def flush():
                nonlocal df
                if chunk:
                    doc_terms = [[vocab.setdefault(w, len(vocab)) for w in words] for words in terms(chunk)]
                    values = np.fromiter(itertools.chain.from_iterable(doc_terms), np.int32)
                    f.write(values.tobytes())
                    lengths.append(np.fromiter(map(len, doc_terms), np.int64, len(doc_terms)))
                    ids.append(np.asarray(chunk_ids, np.int64))
                    t, _, _ = term_pairs(values, np.concatenate([[0], np.cumsum(lengths[-1])]))
                    df = np.pad(df, (0, len(vocab) - len(df))) + np.bincount(t, minlength=len(vocab))
                chunk.clear()
                chunk_ids.clear()

            for block_id, text in block_texts(batches, dead):
                chunk_ids.append(block_id)
                chunk.append(text)
                if len(chunk) == CHUNK_ROWS:
                    flush()
            flush()
        if not ids:
            raise InputError(f"{out_dir.parent}: no live blocks to index")
        block_ids, doc_len = np.concatenate(ids), np.concatenate(lengths)
        ids.clear()
        lengths.clear()
        n_docs, offsets = len(block_ids), np.concatenate([[0], np.cumsum(doc_len)])
        if not vocab:  # stop words only: bm25s needs one term to build its matrix
            vocab[""] = 0
        n_vocab = len(vocab)
        spans = [(a, min(a + CHUNK_ROWS, n_docs)) for a in range(0, n_docs, CHUNK_ROWS)]

        def chunk_pairs(a: int, z: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # read, not mapped: see below
            chunk_terms = np.fromfile(scratch, np.int32, int(offsets[z] - offsets[a]), offset=4 * int(offsets[a]))
            return term_pairs(chunk_terms, offsets[a:z + 1] - offsets[a])

        df = np.pad(df, (0, n_vocab - len(df)))  # the stop-words-only corpus's empty term
        nnz = int(df.sum())
        idx_dtype = np.int32 if max(nnz, n_docs, n_vocab) <= np.iinfo(np.int32).max else np.int64  # as scipy
        indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
        # Lucene's idf with the C library's log a term at a time, as bm25s computes it (numpy's vectorized log may
        # differ in the last bit), rounded to float32 as bm25s stores it
        idf = np.array([math.log(1 + (n_docs - d + 0.5) / (d + 0.5)) if d else 0.0 for d in df.tolist()],
                       np.float64).astype(np.float32)
        bm25 = bm25s.BM25()  # its defaults (Lucene, k1 = 1.5, b = 0.75, float32) and its file names
        avg_len = float(doc_len.mean())
        cursor = indptr[:-1].astype(np.int64)  # where each column's next pair goes
        open_npy = np.lib.format.open_memmap
        open_npy(out_dir / "data.csc.index.npy", "w+", np.float32, (nnz,))
        open_npy(out_dir / "indices.csc.index.npy", "w+", idx_dtype, (nnz,))
        for a, z in spans:
            t, local, tf = chunk_pairs(a, z)
            first = np.searchsorted(t, t)  # each pair's rank within its term's run: the pairs are sorted by term
            pos = cursor[t] + np.arange(len(t)) - first
            # mapped a chunk at a time: written pages leave this process's memory when the map closes
            data = open_npy(out_dir / "data.csc.index.npy", "r+")
            data[pos] = bm25_scores(tf, doc_len[a + local], avg_len, idf[t], bm25.k1, bm25.b)
            del data
            indices = open_npy(out_dir / "indices.csc.index.npy", "r+")
            indices[pos] = (a + local).astype(idx_dtype)
            del indices
            cursor += np.bincount(t, minlength=n_vocab)
    finally:
        scratch.unlink(missing_ok=True)
    np.save(out_dir / "indptr.csc.index.npy", indptr)
    vocab.setdefault("", n_vocab)  # bm25s's empty token, past the matrix's columns
    (out_dir / "vocab.index.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    params = {"k1": bm25.k1, "b": bm25.b, "delta": bm25.delta, "method": bm25.method, "idf_method": bm25.idf_method,
              "dtype": bm25.dtype, "int_dtype": bm25.int_dtype, "num_docs": n_docs, "version": bm25s.__version__,
              "backend": bm25.backend}
    (out_dir / "params.index.json").write_text(json.dumps(params, indent=4))
    np.save(out_dir / BLOCK_IDS, block_ids)
    meta = {"kind": "bm25", "blocks": n_docs, "stopwords": STOPWORDS, "k1": bm25.k1, "b": bm25.b}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class LexicalIndex:
    """A store's BM25 index, memory-mapped: `search` returns block ids, best first."""

    def __init__(self, directory: str | Path):
        import bm25s

        self.dir = Path(directory)
        if not (self.dir / BLOCK_IDS).is_file():
            raise InputError(f"{self.dir}: no BM25 index (a store written before stores carried one: "
                             f"rebuild it with `launch.py reindex data.corpus=...` or `prepare`)")
        self.bm25 = bm25s.BM25.load(str(self.dir), mmap=True, show_progress=False)
        self.block_ids = np.load(self.dir / BLOCK_IDS)

    def __len__(self) -> int:
        return len(self.block_ids)

    def search(self, questions: list[str], k: int, exclude: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """BM25 scores [B, k] float32 and block ids [B, k] int64 (-1 and -inf past the matches: a block
        sharing no term with the question is never returned); ids in row b of `exclude` (-1 = padding)
        are left out."""
        n_ex = 0 if exclude is None else exclude.shape[1]
        depth = min(k + n_ex, len(self))
        scores = np.full((len(questions), k), -np.inf, np.float32)
        ids = np.full((len(questions), k), -1, np.int64)
        if not questions or depth == 0:
            return scores, ids
        # A question's terms mapped onto the index's vocabulary (unknown terms dropped); never grows it.
        vocab = self.bm25.vocab_dict
        for b, words in enumerate(terms(questions)):
            term_ids = [vocab[t] for t in words if t in vocab]
            if not term_ids:
                continue
            s = self.bm25.get_scores_from_ids(term_ids)
            if depth < len(s):  # every row scoring at least the depth-th best: ties at the cut all in
                top = np.flatnonzero(s >= np.partition(s, len(s) - depth)[len(s) - depth])
            else:
                top = np.arange(len(s))
            top = top[np.lexsort((top, -s[top]))][:depth]  # best first, ties by row: the same at any depth
            skip = set() if exclude is None else set(int(e) for e in exclude[b] if e >= 0)
            j = 0
            for row in top:
                block = int(self.block_ids[row])
                if s[row] <= 0 or block in skip:
                    continue
                scores[b, j], ids[b, j] = s[row], block
                j += 1
                if j == k:
                    break
        return scores, ids
