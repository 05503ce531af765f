"""Exact top-k by inner product with faiss: one shard per slice of rows, merged across shards.

Shapes at every boundary: queries `[B, dim] float32`; results scores `[B, k] float32` and ids
`[B, k] int64` (global block ids), best first, padded with id -1 / score -inf when fewer than
k rows exist; exclusions `[B, E] int64` block ids, -1 = padding.
"""
from __future__ import annotations

import numpy as np

from indexer.approx import ApproxShard, IndexSpec

try:  # CPU shards need faiss; the CUDA images we run on have none, and search with indexer.torch_search
    import faiss
except ImportError:  # pragma: no cover - depends on the install
    faiss = None


def gpu_available() -> bool:
    """faiss with a GPU build and a GPU."""
    return faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


# On CPU, faiss's flat search keeps a k-heap per query, which dominates once batches reach 16
# queries; there the torch search of indexer.torch_search over faiss's own copy of the rows is
# several times faster. Below about a million scores a call faiss is as fast (bench/topk.py,
# figures in bench/RESULTS.md).
TORCH_MIN_BATCH, TORCH_MIN_SCORES = 16, 1 << 20
# A single query is another case: faiss parallelises its flat search over queries, so one query runs on
# one thread, at a fraction of the memory bandwidth. BLAS's matrix-vector product streams the rows on
# every core, and torch.topk selects from the scores faster than a heap or argpartition; at 1e6 x 128
# that is about one pass over the rows (bench/topk.py: "flat shard" against "faiss flat" at batch 1).
# Rows are scored a chunk at a time so the scores stay small at any N.
MATVEC_CHUNK_ROWS = 1 << 18


def matvec_topk(rows: np.ndarray, query: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k of rows @ query (one query [dim]): scores [1, k] float32 and ids [1, k] int64, best
    first, ids offset by `offset`, padded with -inf / -1 past the rows. Among equal scores the smaller id
    wins, as in faiss's heap and merge_topk, so a query gets the same blocks alone and in a batch."""
    import torch

    cand_s, cand_i = [], []
    for start in range(0, len(rows), MATVEC_CHUNK_ROWS):
        scores = rows[start:start + MATVEC_CHUNK_ROWS] @ query
        kth = torch.topk(torch.from_numpy(scores), min(k, len(scores))).values[-1].item()
        keep = np.flatnonzero(scores >= kth)  # every row tied with the k-th best too
        cand_s.append(scores[keep])
        cand_i.append(keep + start)
    out_s = np.full((1, k), -np.inf, np.float32)
    out_i = np.full((1, k), -1, np.int64)
    if cand_s:
        scores, ids = np.concatenate(cand_s), np.concatenate(cand_i)
        order = np.lexsort((ids, -scores.astype(np.float64)))[:k]
        out_s[0, :len(order)] = scores[order]
        out_i[0, :len(order)] = ids[order] + offset
    return out_s, out_i


class FlatShard:
    """Rows [offset, offset + n) of one index version in a faiss IndexFlatIP (GPU when present); on CPU,
    large batches go to the torch search over the same memory."""

    def __init__(self, embeddings: np.ndarray, offset: int = 0, use_gpu: bool | None = None):
        if faiss is None:
            raise RuntimeError("a CPU index shard needs faiss: pip install faiss-cpu")
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.offset, self.rows, self.dim = offset, emb.shape[0], emb.shape[1]
        index = faiss.IndexFlatIP(self.dim)
        on_gpu = gpu_available() if use_gpu is None else use_gpu
        if on_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(emb)
        self.index = index
        self.batch_search = self.cpu_rows = None
        if not on_gpu and self.rows:
            from indexer.torch_search import TorchFlatShard
            rows = faiss.rev_swig_ptr(index.get_xb(), self.rows * self.dim).reshape(self.rows, self.dim)
            self.cpu_rows = rows  # a view of faiss's storage, no copy
            self.batch_search = TorchFlatShard(rows, offset)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.batch_search is not None and len(q) >= TORCH_MIN_BATCH and len(q) * self.rows >= TORCH_MIN_SCORES:
            return self.batch_search.search(q, k)
        if self.cpu_rows is not None and len(q) == 1:
            return matvec_topk(self.cpu_rows, q[0], k, self.offset)
        kk = min(k, self.rows)
        if kk == 0:
            return (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        scores, ids = self.index.search(q, kk)
        ids = np.where(ids >= 0, ids + self.offset, -1).astype(np.int64)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        if kk < k:
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        return scores, ids


def shard_bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of `parts` near-equal consecutive slices of `rows` rows: the one split for
    index shards (ShardedIndex, cluster ShardServer) and refresh slices (cluster RefreshCoordinator)."""
    bounds = np.linspace(0, rows, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def make_shard(embeddings: np.ndarray, offset: int = 0, use_gpu: bool | None = None, spec: IndexSpec | None = None):
    """A flat shard on the best device here: faiss on GPU when faiss has a GPU build, else torch on
    CUDA (indexer.torch_search: the CUDA images we run on ship no faiss-gpu), else faiss on CPU.
    `use_gpu`: None = when one is present, False = CPU faiss, True = a GPU or an error. An approximate
    `spec` (indexer.approx: ivf, hnsw, ivfpq) builds that faiss index instead, on the CPU."""
    import torch

    if spec is not None and spec.kind != "flat":
        return ApproxShard(embeddings, offset, spec)

    if use_gpu is not False and gpu_available():
        return FlatShard(embeddings, offset, use_gpu=True)
    if use_gpu is not False and torch.cuda.is_available():
        from indexer.torch_search import TorchFlatShard
        return TorchFlatShard(embeddings, offset, device="cuda")
    if use_gpu:
        raise RuntimeError("a GPU shard was asked for, but neither faiss nor torch sees a GPU")
    return FlatShard(embeddings, offset, use_gpu=False)


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores [B, k_i], ids [B, k_i]) into the global top-k.

    Ties are broken by the smaller block id, so the result does not depend on shard order.
    """
    scores = np.concatenate([s for s, _ in results], axis=1)
    ids = np.concatenate([i for _, i in results], axis=1)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores.astype(np.float64)), axis=-1)
    order = order[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def exclusion_extra(exclude: np.ndarray | None) -> int:
    """How many more than k to ask for so that k survive dropping the exclusions: max E per row."""
    if exclude is None or exclude.size == 0:
        return 0
    return int((exclude >= 0).sum(1).max())


def drop_excluded(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray | None, k: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """From a top-(k + E) result, drop excluded ids and keep the best k (exact: at most E dropped)."""
    if not exclusion_extra(exclude):
        return scores[:, :k], ids[:, :k]
    hit = (ids[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)
    keep = ~hit.any(-1)
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for r in range(len(ids)):
        s, i = scores[r][keep[r]][:k], ids[r][keep[r]][:k]
        out_s[r, :len(s)], out_i[r, :len(i)] = s, i
    return out_s, out_i


def search_excluding(search, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k that never returns an excluded id; `search(queries, k) -> (scores, ids)`."""
    scores, ids = search(queries, k + exclusion_extra(exclude))
    return drop_excluded(scores, ids, exclude, k)


class LiveRowsShard:
    """A shard over some rows only (an edited corpus's live blocks): local row i answers as `ids[i]`.
    Dead rows are not in the shard at all, so top-k over it is exact, with no over-fetching."""

    def __init__(self, embeddings: np.ndarray, ids: np.ndarray, use_gpu: bool | None = None,
                 spec: IndexSpec | None = None):
        self.ids = np.asarray(ids, np.int64)
        self.shard = make_shard(embeddings[self.ids], 0, use_gpu, spec)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, local = self.shard.search(queries, k)
        return scores, np.where(local >= 0, self.ids[np.maximum(local, 0)], -1).astype(np.int64)


class ShardedIndex:
    """Several shards answering as one index (the single-process shard service): flat, exact, unless `spec`
    asks for an approximate kind (indexer.approx; inference only). `dead`: block ids never to return (an
    edited corpus's replaced and deleted blocks); their rows stay in `embeddings`, so ids remain row numbers."""

    def __init__(self, embeddings: np.ndarray, num_shards: int = 1, version: int = 0, checkpoint_step: int = 0,
                 use_gpu: bool | None = None, dead: np.ndarray | None = None, spec: IndexSpec | None = None):
        if dead is None or not len(dead):  # every unedited run: the shards exactly as before
            self.shards = [make_shard(embeddings[a:b], a, use_gpu, spec)
                           for a, b in shard_bounds(len(embeddings), num_shards)]
            self.live = None
        else:
            self.live = np.setdiff1d(np.arange(len(embeddings), dtype=np.int64), dead)
            self.shards = [LiveRowsShard(embeddings, self.live[a:b], use_gpu, spec)
                           for a, b in shard_bounds(len(self.live), num_shards)]
        self.rows = len(embeddings)
        self.embeddings = embeddings  # [rows, dim] float32, kept for re-scoring with a frozen doc tower
        self.version, self.checkpoint_step = version, checkpoint_step
        self.dead, self.use_gpu, self.spec = dead, use_gpu, spec or IndexSpec()

    def with_spec(self, spec: IndexSpec) -> ShardedIndex:
        """The same rows, version and dead blocks in another kind of index (itself if that kind is this one)."""
        if spec == self.spec:
            return self
        return ShardedIndex(self.embeddings, len(self.shards), self.version, self.checkpoint_step, self.use_gpu,
                            self.dead, spec)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return merge_topk([s.search(queries, k) for s in self.shards], k)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [B, dim] float32 -> scores [B, k] float32, ids [B, k] int64, excluded ids never returned."""
        return search_excluding(self._search, queries, k, exclude)
