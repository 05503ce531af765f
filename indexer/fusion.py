"""Hybrid retrieval: fusing the dense model's ranking with BM25's (`retrieval.mode: hybrid`).

Two fusions, both over each ranking's top `retrieval.fusion_depth`, both with BM25's share of the fused score
set by `retrieval.bm25_weight` (alpha; the dense ranking gets 1 - alpha):
  rrf     reciprocal rank fusion (Cormack et al. 2009): a block scores Σ w / (c + rank), rank from 1. It reads
          ranks only, so it needs no calibration between the two scorers; at alpha 0.5 both rankings count alike.
  convex  a convex combination of the two scores, each min-max normalized over the query's own list
          (Bruch et al. 2023, "An Analysis of Fusion Functions for Hybrid Retrieval": it beats RRF in and out
          of domain once alpha is fitted on a few training questions, bench/fusion_weights.py). Unlike RRF it
          keeps how far apart the scores are: a BM25 list whose first block matches far better than the rest
          lifts that block alone. A block missing from a list scores that list's minimum (0).
Ties go to the block ranked first in the earliest ranking (the dense one): the same ids at any depth.
"""
from __future__ import annotations

import numpy as np

FUSIONS = ("rrf", "convex")


def _ranked(scores: list[dict[int, float]], first_seen: dict[int, tuple[int, int]], k: int) -> list[int]:
    total: dict[int, float] = {}
    for part in scores:
        for block, value in part.items():
            total[block] = total.get(block, 0.0) + value
    return sorted(total, key=lambda z: (-total[z], first_seen[z]))[:k]


def _first_seen(rankings: list[np.ndarray], b: int) -> dict[int, tuple[int, int]]:
    seen: dict[int, tuple[int, int]] = {}
    for r, ranking in enumerate(rankings):
        for rank, block in enumerate(ranking[b]):
            if block >= 0:
                seen.setdefault(int(block), (r, rank))
    return seen


def reciprocal_rank_fusion(rankings: list[np.ndarray], k: int, c: float = 60.0,
                           weights: list[float] | None = None) -> np.ndarray:
    """Fuse rankings (each [B, depth] block ids, best first, -1 = none) into [B, k] ids (-1 padded): a block's
    score is Σ w / (c + rank) over the rankings it appears in (w = 1 unless `weights` gives one a ranking)."""
    weights = weights or [1.0] * len(rankings)
    out = np.full((rankings[0].shape[0], k), -1, np.int64)
    for b in range(out.shape[0]):
        parts = [{int(z): w / (c + rank + 1) for rank, z in enumerate(ranking[b]) if z >= 0}
                 for ranking, w in zip(rankings, weights)]
        fused = _ranked(parts, _first_seen(rankings, b), k)
        out[b, :len(fused)] = fused
    return out


def convex_fusion(scores: list[np.ndarray], rankings: list[np.ndarray], k: int,
                  weights: list[float] | None = None) -> np.ndarray:
    """Fuse rankings (each [B, depth] block ids, best first, -1 = none) by their scores (same shapes, any
    scale) into [B, k] ids: a block scores Σ w · (s - min) / (max - min) over the lists it is in, min and max
    over the query's valid entries of each list (a list whose scores are all equal gives each of its blocks 1)."""
    weights = weights or [1.0] * len(rankings)
    out = np.full((rankings[0].shape[0], k), -1, np.int64)
    for b in range(out.shape[0]):
        parts = []
        for s, ranking, w in zip(scores, rankings, weights):
            valid = ranking[b] >= 0
            ids, vals = ranking[b][valid], s[b][valid].astype(np.float64)
            if not len(ids):
                parts.append({})
                continue
            lo, span = vals.min(), vals.max() - vals.min()
            norm = (vals - lo) / span if span > 0 else np.ones_like(vals)
            parts.append({int(z): w * float(v) for z, v in zip(ids, norm)})
        fused = _ranked(parts, _first_seen(rankings, b), k)
        out[b, :len(fused)] = fused
    return out


def fuse(fusion: str, dense: tuple[np.ndarray, np.ndarray], lexical: tuple[np.ndarray, np.ndarray], k: int,
         bm25_weight: float = 0.5, rrf_k: float = 60.0) -> np.ndarray:
    """`retrieval.fusion` of the dense and the BM25 (scores, ids) lists, BM25 weighted `bm25_weight`."""
    weights = [1.0 - bm25_weight, bm25_weight]
    if fusion == "rrf":
        return reciprocal_rank_fusion([dense[1], lexical[1]], k, rrf_k, weights)
    if fusion == "convex":
        return convex_fusion([dense[0], lexical[0]], [dense[1], lexical[1]], k, weights)
    raise ValueError(f"unknown fusion {fusion!r} (one of {', '.join(FUSIONS)})")
