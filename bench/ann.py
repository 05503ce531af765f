"""Approximate indexes for inference (`index.kind`): what each gives up against the exact flat index, side by side.

On the same clustered float32 embeddings [N, dim] (rows around N/100 random centres, as real embeddings
cluster by topic; queries are perturbed rows), for each kind: build seconds, bytes held per row, ms per
query at batch 1 and per batch at 512, and recall@k against the flat index's exact top-k (the share of the
true top-k returned). One row per (N, kind); the flat row is the reference (recall 1.000).

    python bench/ann.py                    # N = 1e4, 1e5, 1e6 at dim 128 (minutes on 2 CPU cores)
    python bench/ann.py --smoke            # N = 4,000 at dim 32, seconds (CI)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.common  # noqa: E402,F401  first: --threads must reach BLAS/OpenMP before numpy and faiss load

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import add_common_args, apply_common_args, count, print_table, time_fn, write_results  # noqa: E402
from indexer.approx import IndexSpec, recall_against_flat  # noqa: E402
from indexer.shards import ShardedIndex  # noqa: E402

SPECS = [IndexSpec("flat"), IndexSpec("ivf", nprobe=8), IndexSpec("ivf", nprobe=32), IndexSpec("hnsw"),
         IndexSpec("ivfpq", nprobe=32, pq_m=16)]  # pq_m 16: 16 bytes a row, 32x smaller than fp32 at dim 128


def clustered(n: int, dim: int, queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(max(1, n // 100), dim)).astype(np.float32)
    rows = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    q = rows[rng.integers(n, size=queries)] + 0.2 * rng.normal(size=(queries, dim)).astype(np.float32)
    return rows.astype(np.float32), q.astype(np.float32)


def bytes_per_row(index: ShardedIndex) -> float:
    import faiss

    total = 0
    for shard in index.shards:
        inner = getattr(shard, "index", None)
        if inner is not None:
            total += len(faiss.serialize_index(inner))
    return total / max(1, index.rows)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="N, comma list (smoke: 1e4)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    apply_common_args(a)
    sizes = [4_000] if a.smoke else [count(s) for s in a.sizes.split(",")]
    if a.smoke:
        a.dim, a.queries, a.repeats = 32, 64, 1
    rng = np.random.default_rng(0)
    rows_out = []
    for n in sizes:
        emb, queries = clustered(n, a.dim, a.queries, rng)
        exact = None
        for spec in SPECS:
            t0 = time.perf_counter()
            index = ShardedIndex(emb, 1, spec=spec, use_gpu=False)
            build = time.perf_counter() - t0
            ids = index.search(queries, a.k)[1]
            exact = ids if spec.kind == "flat" else exact
            cpu = torch.device("cpu")
            one = time_fn(lambda: index.search(queries[:1], a.k), cpu, repeats=a.repeats * 5)["median"]
            batch = time_fn(lambda: index.search(queries, a.k), cpu, repeats=a.repeats)["median"]
            rows_out.append({"rows": n, "kind": spec.kind, "faiss": index.shards[0].description
                             if spec.kind != "flat" else "Flat", "nprobe / ef": spec.nprobe if "ivf" in spec.kind
                             else (spec.ef_search if spec.kind == "hnsw" else ""),
                             "build s": build, "bytes/row": bytes_per_row(index),
                             "ms @1": one * 1e3, f"ms @{a.queries}": batch * 1e3,
                             f"recall@{a.k} vs flat": recall_against_flat(ids, exact)})
            print(rows_out[-1], flush=True)
    print_table("Approximate indexes against flat", rows_out)
    write_results("Approximate indexes (index.kind) against flat", {"dim": a.dim, "k": a.k, "queries": a.queries,
                                                                     "smoke": a.smoke}, rows_out, a.results,
                  notes=["clustered random embeddings (N/100 centres); recall@k: share of the flat index's top-k "
                         "returned", "bytes/row: the faiss index serialized (flat: 4 x dim)"])
    return rows_out


if __name__ == "__main__":
    main()
