"""Exact top-k inner-product search with torch: the shard service on GPUs where faiss has no GPU build,
and on CPU for batches (faiss's per-query heaps are slow there; indexer/shards.py).

Brute force spends its time writing and re-reading the [B, N] score matrix (B=512, N=1e7: 20 GB in
fp32), not in the matmul. So the search runs in two stages, and only the first touches all N rows:

  1. group maxima: the rows are cut into groups of G consecutive rows; for each query only the best
     score of each group is kept ([B, N/G]). On CUDA one Triton kernel does the matmul and the max
     in registers, so the scores never reach memory; elsewhere torch does it in row chunks.
  2. the best `groups_per_k * k` groups per query (2k on CUDA, k on CPU) are re-scored exactly, row by row, in fp32 from
     the stored fp32 vectors, and their top k is the answer.

Stage 2 is exact when stage 1 is: if a row r is among the true top k, fewer than k groups can have
a maximum above score(r), so r's group is among the best k groups. Stage 1 reads a half-precision
copy on CUDA (half the bytes, tensor cores); its rounding (~1e-3 relative) can only matter to a row
within that much of the k-th best, and taking 2k groups rather than k leaves room for it (bench/topk.py
checks recall against an fp32 brute force). On CPU stage 1 is fp32, and exact. On CUDA a shard holds
its rows twice (fp32 + fp16): 1.5x the bytes of the fp32 embeddings.

Shapes: queries [B, dim] float32 -> scores [B, k] float32, ids [B, k] int64 (offset added), best
first, padded with -inf / -1 when the shard has fewer than k rows; the FlatShard interface.

On CPU, shards up to CPU_ONE_STAGE_MAX_ROWS rows skip the grouping: each score tile's own top k, then
the top k of those (exact, one stage).
"""
from __future__ import annotations

import threading

import numpy as np
import torch

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:
    @triton.jit
    def _group_max_kernel(q_ptr, e_ptr, out_ptr, B, N, n_groups, n_mtiles,
                          D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                          TILES: tl.constexpr):
        # One program: BM queries x TILES row tiles of BN rows; the loop lets Triton prefetch the next
        # row tile while the tensor cores work on this one. The BM-tiles of one row range are
        # consecutive program ids, so its rows come from HBM once and from L2 for the others.
        pid = tl.program_id(0)
        pid_m = pid % n_mtiles
        pid_n = pid // n_mtiles
        rm = pid_m * BM + tl.arange(0, BM)
        rd = tl.arange(0, D)
        q = tl.load(q_ptr + rm.to(tl.int64)[:, None] * D + rd[None, :], mask=rm[:, None] < B, other=0.0)
        for t in range(TILES):
            rn = (pid_n * TILES + t) * BN + tl.arange(0, BN)
            e = tl.load(e_ptr + rn.to(tl.int64)[:, None] * D + rd[None, :], mask=rn[:, None] < N, other=0.0)
            s = tl.dot(q, tl.trans(e))  # [BM, BN], fp32 accumulation
            s = tl.where(rn[None, :] < N, s, float("-inf"))
            gmax = tl.max(tl.reshape(s, (BM, BN // G, G)), axis=2)
            rg = (pid_n * TILES + t) * (BN // G) + tl.arange(0, BN // G)
            out = out_ptr + rm.to(tl.int64)[:, None] * n_groups + rg[None, :]
            tl.store(out, gmax, mask=(rm[:, None] < B) & (rg[None, :] < n_groups))

# (rows per tile, tiles per program, warps, pipeline stages): the first is the default, chosen as the
# fastest of these by bench/topk.py, which times each one on a GPU (figures: bench/RESULTS.md).
TRITON_CONFIGS = [(64, 16, 4, 3), (128, 8, 8, 3), (128, 8, 4, 3), (256, 4, 8, 2), (128, 1, 8, 1)]


def triton_usable(device: torch.device, dim: int) -> bool:
    """The fused kernel needs CUDA, Triton, and a power-of-two dim >= 16 (tl.dot's shapes)."""
    return triton is not None and device.type == "cuda" and dim >= 16 and dim & (dim - 1) == 0


def group_max_triton(q: torch.Tensor, emb: torch.Tensor, group: int, config: tuple | None = None,
                     block_m: int = 128) -> torch.Tensor:
    """q [B, D], emb [N, D] (same dtype, contiguous) -> [B, ceil(N/group)] fp32 group maxima."""
    block_n, tiles, num_warps, num_stages = config or TRITON_CONFIGS[0]
    B, D = q.shape
    N = emb.shape[0]
    n_groups = -(-N // group)
    block_m = max(16, min(block_m, triton.next_power_of_2(B)))
    out = torch.empty(B, n_groups, device=q.device, dtype=torch.float32)
    n_mtiles = -(-B // block_m)
    grid = (n_mtiles * -(-N // (block_n * tiles)),)
    _group_max_kernel[grid](q, emb, out, B, N, n_groups, n_mtiles, D=D, BM=block_m, BN=block_n, G=group,
                            TILES=tiles, num_warps=num_warps, num_stages=num_stages)
    return out


def group_max_torch(q: torch.Tensor, emb: torch.Tensor, group: int, chunk_rows: int = 1 << 16) -> torch.Tensor:
    """The same result with plain torch: row chunks of q @ emb^T, max over each group of `group` rows."""
    B, N = q.shape[0], emb.shape[0]
    chunk_rows = max(group, chunk_rows // group * group)
    parts = []
    for start in range(0, N, chunk_rows):
        s = (q @ emb[start:start + chunk_rows].T).float()
        pad = -s.shape[1] % group
        if pad:
            s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        parts.append(s.view(B, -1, group).amax(-1))
    return torch.cat(parts, 1)


def topk_torch(q: torch.Tensor, emb: torch.Tensor, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact one-stage top-k: each chunk's own top k, then the top k of those -> (scores, row ids) [B, k]."""
    scores, ids = [], []
    for start in range(0, emb.shape[0], chunk_rows):
        s, i = (q @ emb[start:start + chunk_rows].T).topk(min(k, len(emb) - start), dim=1)
        scores.append(s)
        ids.append(i + start)
    top, pos = torch.cat(scores, 1).topk(k, dim=1)
    return top, torch.cat(ids, 1).gather(1, pos)


# CPU: score tiles of 2,048 rows stay in cache (4 MB), so taking their maxima costs little more than
# the matmul; up to CPU_ONE_STAGE_MAX_ROWS rows one stage (each tile's own top k, tiles of 4,096 rows)
# beats two, whose re-scoring of k groups of 32 rows per query costs the same whatever the shard's
# size (bench/topk.py measures both; figures in bench/RESULTS.md).
CPU_CHUNK_ROWS, CPU_TOPK_ROWS, CPU_ONE_STAGE_MAX_ROWS, CPU_RESCORE_QUERIES = 2048, 4096, 16_384, 32


class TorchFlatShard:
    """Rows [offset, offset + n) of one index version on a torch device, searched exactly (two stages; one for
    small shards on CPU)."""

    def __init__(self, embeddings: np.ndarray, offset: int = 0, device: str | torch.device = "cpu",
                 group: int = 32, groups_per_k: int | None = None, use_triton: bool | None = None,
                 triton_config: tuple | None = None, one_stage_max_rows: int | None = None):
        emb = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32))
        self.device = torch.device(device)
        self.offset, self.rows, self.dim = offset, emb.shape[0], emb.shape[1]
        # fp32 group maxima (CPU) are exact, so the best k groups hold the top k; half-precision ones
        # (CUDA) get twice as many, room for their rounding.
        self.group = group
        self.groups_per_k = groups_per_k or (2 if self.device.type == "cuda" else 1)
        self.emb = emb.to(self.device)  # fp32: the exact re-scoring in stage 2
        self.use_triton = triton_usable(self.device, self.dim) if use_triton is None else use_triton
        self.triton_config = triton_config
        # Stage 1 reads half precision on CUDA (fp16: 3 more mantissa bits than bf16, and retrieval
        # embeddings are far from its range limits); fp32 elsewhere.
        self.scan = self.emb.half().contiguous() if self.device.type == "cuda" else self.emb
        # Shards up to this many rows are searched in one stage (CPU only: on CUDA two stages always win).
        if one_stage_max_rows is None:
            one_stage_max_rows = CPU_ONE_STAGE_MAX_ROWS if self.device.type == "cpu" else 0
        self.one_stage_max_rows = one_stage_max_rows
        self._local = threading.local()  # CPU re-scoring's gather buffer, reused by each thread's calls

    def group_max(self, q: torch.Tensor) -> torch.Tensor:
        qs = q.to(self.scan.dtype).contiguous()
        if self.use_triton:
            return group_max_triton(qs, self.scan, self.group, self.triton_config)
        return group_max_torch(qs, self.scan, self.group, CPU_CHUNK_ROWS if self.device.type == "cpu" else 1 << 16)

    def rescore(self, q: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """q [B, dim], candidate rows [B, C] -> their exact fp32 scores [B, C]. On CPU in slices of
        queries through one reused gather buffer: a fresh [B, C, dim] tensor costs more in page faults
        than the products (B=512, C=256: 31 ms to allocate and fill, 7 ms into a reused buffer)."""
        q = q.float()
        if self.device.type != "cpu":
            return torch.einsum("bd,bcd->bc", q, self.emb[cand])
        B, C = cand.shape
        n = min(B, CPU_RESCORE_QUERIES)
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.shape[0] < n * C:
            buffer = self._local.buffer = torch.empty(n * C, self.dim)
        out = torch.empty(B, C)
        for i in range(0, B, n):
            rows = cand[i:i + n].flatten()
            g = torch.index_select(self.emb, 0, rows, out=buffer[:len(rows)])
            torch.bmm(g.view(-1, C, self.dim), q[i:i + n, :, None], out=out[i:i + n, :, None])
        return out

    @torch.no_grad()
    @torch.autocast("cuda", enabled=False)  # a caller's autocast must not round the exact stage to bf16
    @torch.autocast("cpu", enabled=False)
    def search_tensor(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, dim] float32 on self.device -> (scores, local row ids) [B, min(k, rows)], best first."""
        kk = min(k, self.rows)
        if self.rows <= self.one_stage_max_rows:
            return topk_torch(q, self.emb, kk, CPU_TOPK_ROWS)
        gmax = self.group_max(q)
        n_sel = min(gmax.shape[1], kk * self.groups_per_k)
        best_groups = gmax.topk(n_sel, dim=1).indices  # [B, n_sel]
        cand = (best_groups[:, :, None] * self.group + torch.arange(self.group, device=q.device)).flatten(1)
        valid = cand < self.rows
        cand = torch.where(valid, cand, 0)
        scores = self.rescore(q, cand).masked_fill(~valid, float("-inf"))
        top, pos = scores.topk(kk, dim=1)
        return top, cand.gather(1, pos)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        B = len(q)
        out_s = np.full((B, k), -np.inf, np.float32)
        out_i = np.full((B, k), -1, np.int64)
        if self.rows == 0 or k == 0:
            return out_s, out_i
        # Bound the candidate gather ([B, groups*G, dim] fp32) to ~256 MB per call.
        per_call = max(1, (1 << 26) // (k * self.groups_per_k * self.group * self.dim))
        for i in range(0, B, per_call):
            s, ids = self.search_tensor(q[i:i + per_call], k)
            out_s[i:i + per_call, :s.shape[1]] = s.float().cpu().numpy()
            out_i[i:i + per_call, :ids.shape[1]] = ids.cpu().numpy() + self.offset
        return out_s, out_i
