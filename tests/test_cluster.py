"""The distributed path on a real local Ray cluster, real DeepSpeed CPU engines and real faiss.

Two data-parallel DeepSpeed trainers (gloo), two embedding workers, two shard servers; the index
is refreshed asynchronously while training goes on.
"""
import copy
import json
import threading
from pathlib import Path

import numpy as np
import ray

from cluster.run import pretrain_on_ray, start_index_actors
from indexer.versions import IndexVersions
from trainer.ict import ict
from trainer.prepare import prepare


def flat_topk(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64, ties by smaller id: what one flat index must return."""
    scores = queries.astype(np.float64) @ emb.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(emb)), scores.shape), -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def test_async_refresh_on_ray_with_deepspeed_trainers(local_ray, tiny_cfg):
    cfg = tiny_cfg("ict.steps=2", "pretrain.steps=12", "pretrain.log_every=1", "pretrain.batch_size=4",
                   "refresh.every_steps=2", "refresh.max_staleness=3", "refresh.mode=async",
                   "pretrain.checkpoint_every=4", "cluster.backend=ray", "cluster.trainers=2",
                   "cluster.embedding_workers=2", "cluster.shards=2", "cluster.poll_seconds=0.1", "threads=1")
    prepare(cfg)
    ict(cfg)
    summary = pretrain_on_ray(cfg)

    # at least 3 refreshes completed during training, each one a complete committed version
    assert summary["refreshes"] >= 3, summary["refresh_history"]
    steps = [r["checkpoint_step"] for r in summary["refresh_history"]]
    assert steps == sorted(steps) and all(s % 2 == 0 for s in steps)
    events = [json.loads(line) for line in open(f"{cfg.run_dir}/events.jsonl")]
    train = [e for e in events if e["job"] == "pretrain"]
    assert [e["step"] for e in train] == list(range(1, 13))
    # staleness bounded by the config, and the versions used only move forward
    assert max(e["staleness"] for e in train) <= cfg.refresh.max_staleness
    versions = [e["index_version"] for e in train]
    assert versions == sorted(versions) and versions[-1] > versions[0]
    assert all(np.isfinite(e["loss"]) and 0 <= e["mlm_accuracy"] <= 1 for e in train)
    # the run left a final model, resumable training states and nothing half-written
    assert (Path(cfg.run_dir) / "models" / "realm" / "manifest.json").is_file()
    ckpts = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir())
    assert ckpts == ["step_4", "step_8"]
    index = IndexVersions(f"{cfg.run_dir}/index")
    assert not list(index.root.glob(".staging-*")) and not list(index.root.glob(".tmp-*"))

    # resume=true: the DeepSpeed engines load step_8 (weights_only) and carry on to step 16;
    # the index version history continues
    last_version = index.current().version
    more = copy.deepcopy(cfg)
    more.pretrain.steps, more.pretrain.resume = 16, True
    resumed = pretrain_on_ray(more)
    assert resumed["start_step"] == 8 and resumed["steps"] == 8
    train = [json.loads(line) for line in open(f"{cfg.run_dir}/events.jsonl")]
    after = [e for e in train if e["job"] == "pretrain"][12:]
    assert [e["step"] for e in after] == list(range(9, 17))
    assert min(e["index_version"] for e in after) >= last_version
    assert index.current().version > last_version


def test_shard_service_equals_flat_index_and_swaps_atomically(local_ray, tiny_cfg):
    cfg = tiny_cfg("ict.steps=1", "cluster.backend=ray", "cluster.shards=3", "cluster.embedding_workers=2")
    prepare(cfg)
    ict(cfg)  # publishes v1
    versions = IndexVersions(f"{cfg.run_dir}/index")
    v1 = versions.current()
    emb1 = IndexVersions.load_rows(v1)
    rng = np.random.default_rng(0)
    emb2 = rng.standard_normal(emb1.shape).astype(np.float32)
    v2 = versions.publish(emb2, checkpoint_step=5)  # CURRENT -> v2; the service still serves v1
    shards, service, workers, coordinator = start_index_actors(cfg)
    try:
        ray.get(service.swap.remote(str(v1.path)))
        queries = rng.standard_normal((16, emb1.shape[1])).astype(np.float32)
        k = 7
        scores, ids, version, step = ray.get(service.search.remote(queries, k))
        want_s, want_i = flat_topk(emb1, queries, k)
        assert version == v1.version and step == 0
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
        # exclusions: never returned, and the rest is the flat top-k without them
        exclude = want_i[:, :2].copy()
        _, ids_ex, _, _ = ray.get(service.search.remote(queries, k, exclude))
        assert not (ids_ex[:, :, None] == exclude[:, None, :]).any()
        np.testing.assert_array_equal(ids_ex[:, :k - 2], want_i[:, 2:])

        # queries keep being answered during a swap, each wholly from one version
        flat = {v1.version: flat_topk(emb1, queries, k)[1], v2.version: flat_topk(emb2, queries, k)[1]}
        seen, stop = [], threading.Event()

        def ask():
            while not stop.is_set():
                _, got, ver, _ = ray.get(service.search.remote(queries, k))
                seen.append((ver, got))

        asker = threading.Thread(target=ask)
        asker.start()
        ray.get(service.swap.remote(str(v2.path)))
        for _ in range(5):
            _, got, ver, _ = ray.get(service.search.remote(queries, k))
            seen.append((ver, got))
        stop.set()
        asker.join()
        assert {ver for ver, _ in seen} <= {v1.version, v2.version} and seen[-1][0] == v2.version
        for ver, got in seen:
            np.testing.assert_array_equal(got, flat[ver])
    finally:
        for a in [coordinator, service, *workers, *shards]:
            ray.kill(a)
