"""Lexical retrieval: a BM25 index of a block store (bm25s), and the fusion of two rankings.

The BM25 index lives inside the block store it indexes (`<store>/bm25/`), written in the same atomic
directory before the store's manifest, so it is versioned with the blocks for free: `prepare`,
`reindex` and every `update-corpus` store version carry their own, and a reader that opens a store
opens its index. It holds the live blocks only (an edited store's dead blocks are never indexed), each
as its title and text, lower-cased, English stop words removed; `block_ids.npy` maps its rows to
block ids.

bm25s (sparse-matrix BM25, Lucene's scoring, k1 = 1.5, b = 0.75) rather than our own: it is
maintained, memory-maps its index on load and scores a query with one sparse row slice.

Fusion (`retrieval.mode: hybrid`) is reciprocal rank fusion (Cormack et al. 2009): a block's score is
Σ over rankings of 1 / (c + rank), rank counted from 1, over each ranking's top `depth`. It needs no
calibration between BM25's and the dense model's scores, which live on unrelated scales.
"""
from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.errors import InputError

log = logging.getLogger(__name__)

BM25_DIR = "bm25"
BLOCK_IDS = "block_ids.npy"
STOPWORDS = "en"
CHUNK_ROWS = 65_536  # blocks tokenized at a time while building: the texts of one chunk are in memory


def block_texts(table: pa.Table, dead: np.ndarray) -> Iterator[tuple[int, str]]:
    """(block id, "title text") of each live block, read chunk by chunk from the Arrow table."""
    dead_set = set(int(d) for d in dead)
    for batch in table.select(["block_id", "title", "text"]).to_batches(max_chunksize=CHUNK_ROWS):
        ids, titles, texts = (batch.column(i).to_pylist() for i in range(3))
        for b, title, text in zip(ids, titles, texts):
            if b not in dead_set:
                yield b, f"{title} {text}"


def terms(texts: list[str]) -> list[list[str]]:
    """bm25s's tokenization (lower-cased words of 2+ characters, stop words removed), for blocks and queries."""
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


class TermLists(Sequence):
    """Each block's term ids stored flat (int32 values and int64 offsets: 4 bytes a term, where a list of
    Python ints costs ~36), given to bm25s one block's list at a time."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.values[self.offsets[i]:self.offsets[i + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))


@dataclass
class _TokenizedBlocks:  # the shape bm25s.BM25.index takes: term ids per document, and the vocabulary
    ids: TermLists
    vocab: dict[str, int]


def build_bm25(table: pa.Table, dead: np.ndarray, out_dir: Path) -> dict:
    """Index the live blocks of `table` (BLOCK_SCHEMA) into `out_dir` (called inside the store's atomic
    directory). Texts are tokenized a chunk at a time and their term ids kept flat; beyond that, memory is
    bm25s's index itself (about 12 bytes a distinct (block, term) while it is built)."""
    import bm25s

    ids: list[np.ndarray] = []
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    vocab: dict[str, int] = {}  # term -> id in order of first appearance: the same corpus, the same bytes
    chunk_ids: list[int] = []
    chunk: list[str] = []

    def flush():
        if chunk:
            doc_terms = [[vocab.setdefault(w, len(vocab)) for w in words] for words in terms(chunk)]
            values.append(np.fromiter(itertools.chain.from_iterable(doc_terms), np.int32))
            lengths.append(np.fromiter(map(len, doc_terms), np.int64, len(doc_terms)))
            ids.append(np.asarray(chunk_ids, np.int64))
        chunk.clear()
        chunk_ids.clear()

    for block_id, text in block_texts(table, dead):
        chunk_ids.append(block_id)
        chunk.append(text)
        if len(chunk) == CHUNK_ROWS:
            flush()
    flush()
    if not ids:
        raise InputError(f"{out_dir.parent}: no live blocks to index")
    if not vocab:  # stop words only: bm25s needs one term to build its matrix
        vocab[""] = 0
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
    block_ids = np.concatenate(ids)
    bm25 = bm25s.BM25()
    bm25.index(_TokenizedBlocks(TermLists(np.concatenate(values), offsets), vocab), show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    bm25.save(str(out_dir), show_progress=False)
    np.save(out_dir / BLOCK_IDS, block_ids)
    meta = {"kind": "bm25", "blocks": len(block_ids), "stopwords": STOPWORDS, "k1": bm25.k1, "b": bm25.b}
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


def reciprocal_rank_fusion(rankings: list[np.ndarray], k: int, c: float = 60.0,
                           weights: list[float] | None = None) -> np.ndarray:
    """Fuse rankings (each [B, depth] block ids, best first, -1 = none) into [B, k] ids (-1 padded): a block's
    score is Σ w / (c + rank) over the rankings it appears in (w = 1 unless `weights` gives one a ranking;
    bench/fusion_weights.py); ties go to the block ranked first in the earliest ranking."""
    weights = weights or [1.0] * len(rankings)
    B = rankings[0].shape[0]
    out = np.full((B, k), -1, np.int64)
    for b in range(B):
        score: dict[int, float] = {}
        first_seen: dict[int, tuple[int, int]] = {}
        for r, (ranking, w) in enumerate(zip(rankings, weights)):
            for rank, block in enumerate(ranking[b]):
                block = int(block)
                if block < 0:
                    continue
                score[block] = score.get(block, 0.0) + w / (c + rank + 1)
                first_seen.setdefault(block, (r, rank))
        fused = sorted(score, key=lambda z: (-score[z], first_seen[z]))[:k]
        out[b, :len(fused)] = fused
    return out
