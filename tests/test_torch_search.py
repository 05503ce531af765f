"""indexer.torch_search: the one- and two-stage searches are exact (the torch stages run here on CPU)."""
import numpy as np
import pytest
import torch

from indexer.shards import FlatShard, make_shard
from indexer.torch_search import TorchFlatShard, group_max_torch, triton_usable


def brute_topk(emb: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q.astype(np.float64) @ emb.T.astype(np.float64)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("rows,batch,k,group", [(1000, 7, 8, 32), (1031, 3, 5, 16), (20, 4, 8, 32), (3, 2, 8, 32),
                                                (5000, 70, 8, 32)])
def test_search_equals_brute_force(rows, batch, k, group, stages):
    rng = np.random.default_rng(rows)
    emb = rng.standard_normal((rows, 32), dtype=np.float32)
    q = rng.standard_normal((batch, 32), dtype=np.float32)
    # batch 70: the CPU re-scoring runs in slices of 32 queries through one buffer; 5000 rows: 3 score tiles
    shard = TorchFlatShard(emb, offset=100, group=group, one_stage_max_rows=rows if stages == 1 else 0)
    scores, ids = shard.search(q, k)
    ref = brute_topk(emb, q, k)
    kk = min(k, rows)
    assert (np.sort(ids[:, :kk] - 100, 1) == np.sort(ref, 1)).all()
    assert (ids[:, kk:] == -1).all() and np.isneginf(scores[:, kk:]).all()
    assert np.allclose(scores[:, :kk], np.take_along_axis(q @ emb.T, ids[:, :kk] - 100, 1), atol=1e-4)
    assert (np.diff(scores[:, :kk], axis=1) <= 0).all()  # best first


def test_adversarial_groups_still_exact():
    # All of the true top k sit in one group, and every other group has a near-best row: only an
    # exact group selection finds them all.
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((32 * 40, 16), dtype=np.float32) * 0.01
    q = np.zeros((1, 16), np.float32)
    q[0, 0] = 1.0
    emb[64:72, 0] = np.linspace(10, 9, 8)       # the top 8, all in group 2
    emb[32 * np.arange(3, 40), 0] = 8.99        # one runner-up in each other group
    _, ids = TorchFlatShard(emb, group=32, one_stage_max_rows=0).search(q, 8)
    assert sorted(ids[0]) == list(range(64, 72))


def test_group_max_pads_the_last_group():
    emb = torch.arange(10, dtype=torch.float32)[:, None]
    g = group_max_torch(torch.ones(1, 1), emb, group=4, chunk_rows=4)
    assert g.tolist() == [[3.0, 7.0, 9.0]]


def test_make_shard_without_gpu_is_faiss_on_cpu():
    emb = np.eye(4, dtype=np.float32)
    assert isinstance(make_shard(emb), FlatShard if not torch.cuda.is_available() else object)
    assert isinstance(make_shard(emb, use_gpu=False), FlatShard)


@pytest.mark.skipif(not triton_usable(torch.device("cuda"), 128) or not torch.cuda.is_available(),
                    reason="needs CUDA and Triton")
def test_triton_group_max_matches_torch_on_gpu():
    from indexer.torch_search import TRITON_CONFIGS, group_max_triton
    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.standard_normal((100_003, 128), dtype=np.float32)).cuda().half()
    for B in (1, 37, 512):
        q = torch.from_numpy(rng.standard_normal((B, 128), dtype=np.float32)).cuda().half()
        ref = group_max_torch(q, emb, 32)
        for cfg in TRITON_CONFIGS:
            assert torch.allclose(group_max_triton(q, emb, 32, cfg), ref, atol=1e-2, rtol=1e-3), (B, cfg)


def test_cpu_flat_shard_large_batches_take_the_torch_path_and_agree_with_faiss():
    from indexer.shards import TORCH_MIN_BATCH, TORCH_MIN_SCORES
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((TORCH_MIN_SCORES // TORCH_MIN_BATCH + 17, 16), dtype=np.float32)
    q = rng.standard_normal((TORCH_MIN_BATCH, 16), dtype=np.float32)
    shard = FlatShard(emb, offset=5, use_gpu=False)
    assert shard.batch_search is not None
    assert np.shares_memory(shard.batch_search.emb.numpy(), faiss_rows(shard))  # no second copy
    s, i = shard.search(q, 8)
    ref = brute_topk(emb, q, 8)
    assert (np.sort(i - 5, 1) == np.sort(ref, 1)).all()
    s1, i1 = shard.search(q[:1], 8)  # a small batch stays on faiss: same answer
    assert (i1[0] == i[0]).all() and np.allclose(s1[0], s[0], atol=1e-4)


def faiss_rows(shard) -> np.ndarray:
    import faiss
    return faiss.rev_swig_ptr(shard.index.get_xb(), shard.rows * shard.dim)
