import numpy as np
import pytest

from core.errors import InputError
from indexer.shards import FlatShard, ShardedIndex, merge_topk
from indexer.versions import IndexVersions


def brute_topk(emb, queries, k):
    scores = queries @ emb.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_sharded_topk_equals_brute_force(num_shards):
    rng = np.random.default_rng(num_shards)
    emb = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    scores, ids = ShardedIndex(emb, num_shards, use_gpu=False).search(queries, 10)
    b_scores, b_ids = brute_topk(emb, queries, 10)
    np.testing.assert_array_equal(ids, b_ids)
    np.testing.assert_allclose(scores, b_scores, rtol=1e-5, atol=1e-5)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_excluded_blocks_are_never_retrieved():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((100, 8)).astype(np.float32)
    queries = emb[:10] * 5  # each query's best match is its own row
    exclude = np.full((10, 3), -1, np.int64)
    exclude[:, 0] = np.arange(10)
    exclude[::2, 1] = np.arange(10, 15)
    index = ShardedIndex(emb, 3, use_gpu=False)
    _, ids = index.search(queries, 8, exclude)
    for row, ex in zip(ids, exclude):
        assert not set(row.tolist()) & set(ex[ex >= 0].tolist())
        assert (row >= 0).all() and len(set(row.tolist())) == 8
    # and what remains is exactly the brute-force top-k over the non-excluded rows
    scores = queries @ emb.T
    for r in range(10):
        scores[r, exclude[r][exclude[r] >= 0]] = -np.inf
    np.testing.assert_array_equal(ids, np.argsort(-scores, 1, kind="stable")[:, :8])


def test_k_larger_than_shard_pads_with_minus_one():
    emb = np.eye(3, dtype=np.float32)
    scores, ids = FlatShard(emb, use_gpu=False).search(np.eye(3, dtype=np.float32), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


def test_merge_breaks_ties_by_block_id():
    a = (np.array([[1.0, 0.5]], np.float32), np.array([[7, 3]]))
    b = (np.array([[1.0, 0.9]], np.float32), np.array([[2, 9]]))
    _, ids = merge_topk([a, b], 3)
    assert ids.tolist() == [[2, 7, 9]]


def test_index_versions_publish_current_and_detect_corruption(tmp_path):
    versions = IndexVersions(tmp_path / "index")
    assert versions.current() is None
    e1 = np.ones((10, 4), np.float32)
    v1 = versions.publish(e1, checkpoint_step=0)
    v2 = versions.publish(e1 * 2, checkpoint_step=100)
    assert (v1.version, v2.version) == (1, 2)
    cur = versions.current()
    assert cur.version == 2 and cur.checkpoint_step == 100
    np.testing.assert_array_equal(IndexVersions.load_rows(cur, 2, 5), e1[2:5] * 2)
    versions.publish(e1 * 3, checkpoint_step=200)
    versions.gc(keep=2)
    assert versions.versions() == [2, 3]
    # flip one byte in the newest slice: the load refuses it and names the file
    path = versions.current().path / "slice_000.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="slice_000.npy: truncated or corrupt"):
        IndexVersions.load_rows(versions.current())


def test_incomplete_staging_is_never_committed(tmp_path):
    versions = IndexVersions(tmp_path / "index")
    v = versions.next_version()
    staging = versions.staging_dir(v)
    versions.write_slice(staging, 0, 0, np.zeros((5, 4), np.float32))
    with pytest.raises(InputError, match="slice 1 missing"):
        versions.commit(v, 0, num_slices=2, total_rows=10)
    assert versions.current() is None and versions.versions() == []


def test_find_returns_the_newest_version_built_by_a_doc_encoder(tmp_path):
    versions = IndexVersions(tmp_path / "index")
    emb = np.zeros((4, 2), np.float32)
    for step, encoder in enumerate(["a", "b", "a", "c"]):
        versions.publish(emb + step, checkpoint_step=step, extra={"doc_encoder_id": encoder})
    found = versions.find(doc_encoder_id="a")
    assert (found.version, found.checkpoint_step) == (3, 2)
    np.testing.assert_array_equal(IndexVersions.load_rows(found), emb + 2)
    assert versions.find(doc_encoder_id="z") is None and versions.current().version == 4


@pytest.mark.parametrize("rows", [0, 5, 1000])
def test_single_query_search_equals_batched_search(rows, monkeypatch):
    """A batch of 1 takes the matrix-vector path (indexer.shards.matvec_topk), others faiss: the same blocks
    in the same order, in chunks smaller than the shard, with equal rows tied (the smaller id first) and k
    past the rows."""
    import indexer.shards as shards

    monkeypatch.setattr(shards, "MATVEC_CHUNK_ROWS", 64)
    rng = np.random.default_rng(rows)
    emb = rng.standard_normal((rows, 16)).astype(np.float32)
    if rows > 100:
        emb[500:510] = emb[7]  # eleven equal rows: ties across chunks and at the k-th place
    queries = np.concatenate([emb[7:8] if rows > 100 else np.ones((1, 16), np.float32),
                              rng.standard_normal((3, 16)).astype(np.float32)])
    for num_shards in (1, 2):
        index = ShardedIndex(emb, num_shards, use_gpu=False)
        for k in (1, 8, 12):
            b_scores, b_ids = index.search(queries, k)
            for i in range(len(queries)):
                scores, ids = index.search(queries[i:i + 1], k)
                np.testing.assert_array_equal(ids, b_ids[i:i + 1])
                np.testing.assert_allclose(scores, b_scores[i:i + 1], rtol=1e-5, atol=1e-5)
                assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (1, k)
    if rows > 100:  # one shard alone: the tied rows, smaller ids first, ids offset
        ids = FlatShard(emb, offset=100, use_gpu=False).search(queries[:1], 8)[1]
        assert ids[0].tolist() == [107, *range(600, 607)]
