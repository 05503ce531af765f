"""Approximate inner-product shards (faiss) for inference at Wikipedia scale: `index.kind` ivf | hnsw | ivfpq.

13M blocks x 128 fp32 is 6.7 GB per copy and a flat scan of it 6.7 GB of memory traffic per query batch;
for fine-tuning, evaluation and serving an approximate index trades a little recall for much less of both:
  ivf    IVF{nlist},Flat      the rows split into nlist k-means cells, `nprobe` cells scanned per query
  hnsw   HNSW{m},Flat         a navigable small-world graph, `ef_search` candidates kept while searching
  ivfpq  IVF{nlist},PQ{pq_m}  IVF over product-quantized rows: pq_m bytes a row instead of 4 x dim
Pre-training keeps exact search: REALM's retriever learns from which blocks come back, and an index that
misses some of the true top-k would bias that signal (and the paper's, and our staleness accounting, assume
exact top-k over the stale embeddings). `recall_against_flat` measures what each kind gives up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

try:
    import faiss
except ImportError:  # pragma: no cover - depends on the install
    faiss = None

TRAIN_SEED = 1234
MIN_POINTS_PER_CELL = 39  # faiss's own guideline for k-means: fewer points per centroid train poor cells


@dataclass(frozen=True)
class IndexSpec:
    kind: str = "flat"     # flat | ivf | hnsw | ivfpq
    nlist: int = 0         # ivf, ivfpq: k-means cells (0: 4 sqrt(rows), at most rows / 39)
    nprobe: int = 16       # ivf, ivfpq: cells scanned per query
    hnsw_m: int = 32       # hnsw: graph neighbours a node
    ef_search: int = 64    # hnsw: candidate list while searching (at least k is used)
    pq_m: int = 16         # ivfpq: bytes a row (sub-quantizers); must divide the dimension

    def factory(self, rows: int, dim: int) -> str:
        """The faiss index_factory string for `rows` rows of `dim` dimensions."""
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        nlist = self.nlist or int(4 * math.sqrt(rows))
        nlist = max(1, min(nlist, rows // MIN_POINTS_PER_CELL))
        if self.kind == "ivf":
            return f"IVF{nlist},Flat"
        if self.kind == "ivfpq":
            if dim % self.pq_m:
                raise ValueError(f"index.pq_m={self.pq_m} does not divide the embedding dimension {dim}")
            nbits = max(1, min(8, int(math.log2(max(2, rows // MIN_POINTS_PER_CELL)))))  # 2^nbits centroids
            return f"IVF{nlist},PQ{self.pq_m}x{nbits}"
        raise ValueError(f"index kind {self.kind!r} is not approximate")


class ApproxShard:
    """Rows [offset, offset + n) in an approximate faiss index; the same search contract as FlatShard."""

    def __init__(self, embeddings: np.ndarray, offset: int, spec: IndexSpec):
        if faiss is None:
            raise RuntimeError("an approximate index needs faiss: pip install faiss-cpu")
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.offset, self.rows, self.dim, self.spec = offset, emb.shape[0], emb.shape[1], spec
        self.description = spec.factory(max(1, self.rows), self.dim)
        index = faiss.index_factory(self.dim, self.description, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained and self.rows:
            index.train(emb)  # k-means on every row: deterministic (faiss seeds its clustering)
        if self.rows:
            index.add(emb)
        if spec.kind in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(index).nprobe = spec.nprobe
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        kk = min(k, self.rows)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        if kk == 0:
            return scores, ids
        if self.spec.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.spec.ef_search, kk)
        s, i = self.index.search(q, kk)
        found = i >= 0
        ids[:, :kk] = np.where(found, i + self.offset, -1)
        scores[:, :kk] = np.where(found, s, -np.inf)
        return scores, ids


def recall_against_flat(approx_ids: np.ndarray, flat_ids: np.ndarray) -> float:
    """Mean share of the exact top-k (flat_ids [B, k], -1 = none) that the approximate top-k also returns."""
    hits = [len(set(a[a >= 0].tolist()) & set(f[f >= 0].tolist())) / max(1, int((f >= 0).sum()))
            for a, f in zip(approx_ids, flat_ids)]
    return float(np.mean(hits)) if hits else 1.0
