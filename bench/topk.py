"""Exact top-k inner-product search: shard service vs one faiss flat index vs numpy vs torch.

On the same random float32 embeddings [N, dim], for query batches of 1 and 512:
  faiss flat  one faiss IndexFlatIP, searched directly (the library alone)
  flat shard  one indexer.shards.FlatShard: that faiss index, with one query sent to BLAS's
              matrix-vector product + torch.topk (matvec_topk) and batches of 16+ queries (from a
              million scores a call) to the torch search, both over the same memory (CPU)
  sharded     indexer.shards.ShardedIndex with S FlatShards (per-shard search + merge_topk)
  numpy       matmul + argpartition, what HF's RealmRetriever does (unsorted top-k)
  torch-*     exact matmul + topk in row chunks on a torch device: fp32 storage, and fp16/bf16
              storage whose chunk winners are re-scored in fp32 (the plain brute force on a GPU)
  grouped     indexer.torch_search.TorchFlatShard, the shard service's GPU path when faiss has no
              GPU: group maxima of 32 rows (one fused Triton kernel on CUDA), then the best groups
              re-scored exactly in fp32; one row per Triton tile config, and the shard service over
              4 such shards

Every method's ids are checked against numpy's (recall 1.0 = same id sets; a differing id counts
as a hit when its score ties the k-th best within float32 rounding). Beyond --max-rows only the
torch path runs, and its fp32 result is the reference.

    python bench/topk.py                 # CPU: N = 1e4 .. 1e6; with CUDA also torch on GPU up to 1e7
    python bench/topk.py --smoke         # N = 1e4, seconds (CI)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.common  # noqa: E402,F401  first: --threads must reach BLAS/OpenMP before numpy and torch load

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    add_common_args,
    apply_common_args,
    count,
    int_list,
    print_table,
    time_fn,
    write_results,
)

Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # queries [B, dim] -> (scores, ids) [B, k]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batches", type=int_list, default=[1, 512],
                   help="query batch sizes, comma list")
    p.add_argument("--min-rows", type=count, default=10_000)
    p.add_argument("--max-rows", type=count, help="largest N for faiss / numpy (default 1e6; smoke 1e4)")
    p.add_argument("--shards", type=int, default=4, help="shards of the ShardedIndex")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--torch", choices=["auto", "on", "off"], default="auto",
                   help="torch matmul+topk path: auto = on CUDA when faiss has no GPU; on = also on CPU")
    p.add_argument("--torch-max-rows", type=count, help="largest N for the torch path (default 1e7 CUDA)")
    p.add_argument("--torch-dtypes", default="fp32,fp16,bf16", help="storage dtypes of the torch path")
    p.add_argument("--oversample", type=int, default=4,
                   help="fp16/bf16: each chunk keeps k*oversample winners, re-scored in fp32")
    p.add_argument("--grouped", choices=["auto", "on", "off"], default="auto",
                   help="indexer.torch_search rows: auto = with the torch path; on = also on CPU")
    a = p.parse_args(argv)
    apply_common_args(a)
    if a.smoke:
        a.max_rows = a.max_rows or 10_000
        a.torch_max_rows = a.torch_max_rows or a.max_rows
        a.repeats, a.warmup = 1, 1
    a.max_rows = a.max_rows or 1_000_000
    a.torch_dtypes = [d for d in a.torch_dtypes.split(",") if d]
    if bad := [d for d in a.torch_dtypes if d not in TORCH_DTYPES]:
        p.error(f"--torch-dtypes: unknown {bad}; choose from {list(TORCH_DTYPES)}")
    try:
        from indexer.shards import gpu_available
        a.faiss, a.faiss_gpu = True, gpu_available()
    except ImportError:  # the GPU image ships no faiss: numpy and torch rows still run
        a.faiss, a.faiss_gpu = False, False
    a.torch_on = a.torch == "on" or (a.torch == "auto" and a.device.type == "cuda" and not a.faiss_gpu)
    a.torch_max_rows = a.torch_max_rows or (10_000_000 if a.device.type == "cuda" else a.max_rows)
    a.grouped_on = a.grouped == "on" or (a.grouped == "auto" and a.torch_on)
    if "fp32" not in a.torch_dtypes and a.torch_on:
        a.torch_dtypes.insert(0, "fp32")  # the reference beyond --max-rows
    return a


def fmt_rows(n: int) -> str:
    """1e4-style for powers of ten, 250,000-style otherwise."""
    e = round(math.log10(n)) if n > 0 else 0
    return f"1e{e}" if n == 10 ** e else f"{n:,}"


def sizes(lo: int, hi: int) -> list[int]:
    """Powers of ten from lo to hi, plus hi itself when it is not one."""
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 10
    if not out or out[-1] != hi:
        out.append(hi)
    return out


# ---- the searches ----------------------------------------------------------------------------

def numpy_search(emb: np.ndarray, k: int) -> Search:
    """HF RealmRetriever: scores = q @ E^T, argpartition for the (unsorted) top k.

    Queries are taken in chunks so the [B, N] score matrix stays under ~512 MB; HF does not chunk,
    but at these sizes the cost is the same and the machine keeps its memory.
    """
    rows_per_chunk = max(1, (1 << 27) // max(1, len(emb)))

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids_out, sc_out = [], []
        for i in range(0, len(q), rows_per_chunk):
            scores = q[i:i + rows_per_chunk] @ emb.T
            ids = np.argpartition(scores, -k, axis=1)[:, -k:]
            ids_out.append(ids)
            sc_out.append(np.take_along_axis(scores, ids, 1))
        return np.concatenate(sc_out), np.concatenate(ids_out).astype(np.int64)
    return search


class TorchTopK:
    """Exact top-k on a torch device: row chunks of q @ E^T, per-chunk topk, then a topk of the winners.

    fp16/bf16 storage halves memory and traffic; their scores are rounded (bf16 keeps 8 bits), so each
    chunk keeps k*oversample candidates, which are re-scored in fp32 (from the stored vectors) before
    the final top k. Recall is then limited only by the storage rounding of the vectors themselves.
    """

    def __init__(self, emb: torch.Tensor, dtype: torch.dtype, k: int, oversample: int):
        self.emb = emb.to(dtype)
        self.dtype, self.k = dtype, k
        self.keep = k if dtype == torch.float32 else k * oversample

    def __call__(self, q_np: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dev, N = self.emb.device, len(self.emb)
        q = torch.from_numpy(q_np).to(dev)  # the host->device copy is part of a query's cost
        # Chunk so one [B, chunk] score matrix stays near 1 GB: memory flat in N.
        chunk = min(N, max(1 << 16, (1 << 28) // len(q)))
        qd = q.to(self.dtype)
        cand_s, cand_i = [], []
        for start in range(0, N, chunk):
            s = qd @ self.emb[start:start + chunk].T
            ts, ti = s.topk(min(self.keep, s.shape[1]), dim=1)
            cand_s.append(ts)
            cand_i.append(ti + start)
        ids = torch.cat(cand_i, 1)
        if self.dtype == torch.float32:
            scores = torch.cat(cand_s, 1)
        else:  # re-score the few winners exactly, from the stored vectors upcast to fp32
            scores = torch.einsum("bd,bcd->bc", q, self.emb[ids].float())
        top_s, pos = scores.topk(min(self.k, scores.shape[1]), dim=1)
        return top_s.float().cpu().numpy(), ids.gather(1, pos).cpu().numpy()


def grouped_methods(a: argparse.Namespace, N: int, emb_np: np.ndarray | None, emb_t: torch.Tensor | None
                    ) -> list[tuple[str, Search, float]]:
    """TorchFlatShard rows: one per Triton tile config on CUDA (the first is the default), else the
    torch stage 1; plus the shard service (ShardedIndex) over --shards such shards."""
    from indexer.torch_search import TRITON_CONFIGS, TorchFlatShard, triton_usable

    host = emb_np if emb_np is not None else emb_t.cpu().numpy()
    dev = a.device.type
    configs = TRITON_CONFIGS if triton_usable(a.device, a.dim) else [None]
    t0 = time.perf_counter()
    shard = TorchFlatShard(host, device=a.device)  # one copy on the device, searched with each config
    build = time.perf_counter() - t0

    def search_with(q: np.ndarray, cfg: tuple | None) -> tuple[np.ndarray, np.ndarray]:
        shard.triton_config = cfg
        return shard.search(q, a.k)

    out = [(f"grouped {dev}" + (" triton {}x{} w{} s{}".format(*cfg) if cfg else " torch"),
            lambda q, cfg=cfg: search_with(q, cfg), build) for cfg in configs]
    if a.faiss and dev == "cuda":  # the shard service's own path: make_shard puts torch shards on the GPU
        from indexer.shards import ShardedIndex
        t0 = time.perf_counter()
        sharded = ShardedIndex(host, a.shards, use_gpu=True)
        out.append((f"sharded x{a.shards} grouped {dev}", lambda q, s=sharded: s.search(q, a.k),
                    time.perf_counter() - t0))
    return out


# ---- checking --------------------------------------------------------------------------------

def exact_scores(emb_rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float64 scores of q [B, dim] against gathered rows [B, k, dim]."""
    return np.einsum("bd,bkd->bk", q.astype(np.float64), emb_rows.astype(np.float64))


def recall(ids: np.ndarray, ref_ids: np.ndarray, q: np.ndarray, rows: Callable[[np.ndarray], np.ndarray]) -> float:
    """Fraction of returned ids in the reference top k; an id outside it still counts when its exact
    score ties the reference's k-th best within float32 rounding (then either id is a right answer)."""
    ids, ref_ids = np.asarray(ids), np.asarray(ref_ids)
    hits = np.array([np.isin(a, b) for a, b in zip(ids, ref_ids)])
    if hits.all():
        return 1.0
    got = exact_scores(rows(np.where(ids < 0, 0, ids)), q)
    kth = exact_scores(rows(ref_ids), q).min(1, keepdims=True)
    scale = np.abs(q).sum(1, keepdims=True) * 1e-6 * 4  # float32 error bound of a dim-term dot product, roughly
    tie = (ids >= 0) & (got >= kth - scale)
    return float((hits | tie).mean())


def fmt_recall(r: float | None) -> str:
    if r is None:
        return "ref"
    if r == 1.0:
        return "1.0"
    return min(f"{r:.6f}", "0.999999")  # never rounds up to a false 1.0


# ---- the benchmark ---------------------------------------------------------------------------

def bench_size(a: argparse.Namespace, N: int, rng: np.random.Generator) -> list[dict]:
    rows: list[dict] = []
    cpu_side = N <= a.max_rows
    queries = rng.standard_normal((max(a.batches) + a.repeats + a.warmup, a.dim), dtype=np.float32)
    emb_np: np.ndarray | None = None
    methods: list[tuple[str, Search, float | None]] = []  # (name, search, build seconds)
    if cpu_side:
        emb_np = rng.standard_normal((N, a.dim), dtype=np.float32)
        methods.append(("numpy (HF)", numpy_search(emb_np, a.k), None))
        if a.faiss:
            from indexer.shards import FlatShard, ShardedIndex
            t0 = time.perf_counter()
            flat = FlatShard(emb_np, use_gpu=None if a.faiss_gpu else False)
            build = time.perf_counter() - t0
            methods.append(("faiss flat" + (" (GPU)" if a.faiss_gpu else ""),
                            lambda q, f=flat: f.index.search(np.ascontiguousarray(q), a.k), build))
            methods.append(("flat shard", lambda q, f=flat: f.search(q, a.k), build))
            t0 = time.perf_counter()
            sharded = ShardedIndex(emb_np, a.shards, use_gpu=None if a.faiss_gpu else False)
            methods.append((f"sharded x{a.shards}", lambda q, s=sharded: s.search(q, a.k), time.perf_counter() - t0))
    emb_t: torch.Tensor | None = None
    if a.torch_on and N <= a.torch_max_rows:
        t0 = time.perf_counter()
        if emb_np is not None:
            emb_t = torch.from_numpy(emb_np).to(a.device)
        else:  # beyond --max-rows: generate on the device (1e7 x 128 would be 5 GB of host work)
            g = torch.Generator(a.device).manual_seed(N)
            emb_t = torch.randn(N, a.dim, device=a.device, generator=g)
        upload = time.perf_counter() - t0
        for name in a.torch_dtypes:
            t0 = time.perf_counter()
            tk = TorchTopK(emb_t, TORCH_DTYPES[name], a.k, a.oversample)
            methods.append((f"torch {a.device.type} {name}", tk, upload + time.perf_counter() - t0))
    if a.grouped_on and N <= a.torch_max_rows:
        methods += grouped_methods(a, N, emb_np, emb_t)
    if not methods:
        return rows

    def gather_rows(ids: np.ndarray) -> np.ndarray:
        if emb_np is not None:
            return emb_np[ids]
        return emb_t[torch.from_numpy(ids).to(emb_t.device)].float().cpu().numpy()

    ref_name = methods[0][0]  # numpy when it ran, else torch fp32
    for B in a.batches:
        check_q = queries[:B]
        ref_ids = methods[0][1](check_q)[1]
        times: dict[str, float] = {}
        for name, search, build in methods:
            ids = search(check_q)[1]
            r = None if name == ref_name and not cpu_side else recall(ids, ref_ids, check_q, gather_rows)
            # Each timed call gets other queries (batch 1: a different query every call).
            starts = iter(range(a.warmup + a.repeats))

            def call(search=search, starts=starts, B=B) -> None:
                j = next(starts)
                search(queries[j:j + B])

            on_device = name.startswith(("torch", "grouped", "sharded")) and a.device.type != "cpu"
            t = time_fn(call, a.device if on_device else torch.device("cpu"), a.repeats, a.warmup)
            times[name] = t["median"]
            rows.append({"rows": fmt_rows(N), "batch": B, "method": name,
                         "latency ms": 1e3 * t["median"], "queries/s": B / t["median"], "recall": fmt_recall(r),
                         "build s": build})
        base = next((n for n in times if n.startswith("faiss flat")), None)
        for row in rows[-len(methods):]:
            row["time / flat"] = times[row["method"]] / times[base] if base else None
        print("  " + "; ".join(f"N={fmt_rows(N)} B={B} {r['method']}: {r['latency ms']:.3g} ms recall {r['recall']}"
                               for r in rows[-len(methods):]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    torch.set_float32_matmul_precision("highest")  # no TF32: the fp32 path must be exact for the recall check
    rng = np.random.default_rng(0)
    hi = max(a.max_rows, a.torch_max_rows if a.torch_on else 0)
    rows: list[dict] = []
    for N in sizes(a.min_rows, hi):
        rows += bench_size(a, N, rng)
    config = {"dim": a.dim, "k": a.k, "batches": ",".join(map(str, a.batches)), "shards": a.shards,
              "max_rows": fmt_rows(a.max_rows),
              "torch": f"{a.device.type} up to {fmt_rows(a.torch_max_rows)}" if a.torch_on else "off",
              "faiss_gpu": a.faiss_gpu, "repeats": a.repeats, "warmup": a.warmup, "smoke": a.smoke}
    notes = ["embeddings and queries: standard normal float32; latency = median per call, queries/s = batch / latency",
             "time / flat: latency relative to the plain faiss flat index (ours / faiss, numpy / faiss, torch / faiss)",
             "recall vs numpy's exact top-k (ties allowed); beyond max_rows vs torch fp32 ('ref')",
             ("torch rows include the query upload and the result download; fp16/bf16 re-score k*oversample "
              f"chunk winners in fp32 (oversample {a.oversample})")]
    title = f"Exact top-{a.k} search"
    print_table(title, rows)
    write_results(title, config, rows, a.results, a.device, notes)
    return rows


if __name__ == "__main__":
    main()
