"""Thin Ray actors around trainer/ and indexer/: shard servers, the shard service, embedding
workers and DeepSpeed trainers. Each holds state and forwards to plain functions; no model math
lives here.

    trainer ──search──▶ ShardService ──fan-out──▶ ShardServer × N   (one version per query)
    trainer ──publish──▶ run_dir/published/step_N ──▶ RefreshCoordinator (cluster/refresh.py)
                          ──slices──▶ EmbeddingWorker × M ──▶ index/vNNNN ──swap──▶ ShardService
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from cluster.ports import free_port

# ---- shard servers and the service that merges them -------------------------------------------


@ray.remote
class ShardServer:
    """Rows [lo, hi) of an index version in a flat index (faiss, or torch on CUDA); up to two versions side by side,
    so queries on the old version are answered while the new one loads (threaded actor)."""

    def __init__(self, index_root: str, shard: int, num_shards: int, use_gpu: bool = False):
        from core.logs import setup_logging
        from indexer.versions import IndexVersions

        setup_logging()
        self.root, self.shard, self.num_shards, self.use_gpu = Path(index_root), shard, num_shards, use_gpu
        self.by_version: dict = {}

        current = IndexVersions(self.root).current()  # a restarted shard comes back with CURRENT
        if current is not None:
            self.load(str(current.path))

    def load(self, version_dir: str) -> dict:
        from indexer.shards import make_shard, shard_bounds
        from indexer.versions import IndexVersions

        v = IndexVersions(self.root).open(version_dir)
        lo, hi = shard_bounds(v.rows, self.num_shards)[self.shard]
        shard = make_shard(IndexVersions.load_rows(v, lo, hi), lo, self.use_gpu)
        keep = {ver: s for ver, s in self.by_version.items() if ver >= v.version - 1}
        keep[v.version] = shard
        self.by_version = keep  # one assignment: a concurrent search sees the old dict or the new
        return {"version": v.version, "rows": hi - lo, "pid": os.getpid()}

    def search(self, queries: np.ndarray, k: int, version: int) -> tuple[np.ndarray, np.ndarray]:
        shard = self.by_version.get(version)
        if shard is None:
            raise LookupError(f"shard {self.shard}: index version {version} is not loaded "
                              f"(have {sorted(self.by_version)})")
        return shard.search(queries, k)

    def pid(self) -> int:
        return os.getpid()


@dataclass(frozen=True)
class ServedVersion:
    version: int
    checkpoint_step: int
    path: str
    manifest: dict


SHARD_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, LookupError)


@ray.remote
class ShardService:
    """Fans a top-k query out to every shard and merges: the result equals one flat index over
    the same embeddings. A swap loads the new version on every shard first and then moves the
    pointer in one assignment, so each query is answered wholly from one version."""

    def __init__(self, shards: list, retries: int = 5, retry_timeout_s: float = 120.0):
        self.shards = shards
        self.current: ServedVersion | None = None
        self.retries, self.retry_timeout_s = retries, retry_timeout_s
        self.recoveries: list[dict] = []  # one per query that needed a shard to come back

    async def swap(self, version_dir: str) -> dict:
        from indexer.versions import IndexVersions

        manifest = IndexVersions.read_manifest(version_dir)
        await asyncio.gather(*[s.load.remote(version_dir) for s in self.shards])
        self.current = ServedVersion(manifest["version"], manifest["checkpoint_step"], version_dir, manifest)
        return self.status()

    async def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
        """-> scores [B, k] float32, ids [B, k] int64, version, checkpoint_step.

        A shard that died is waited for (Ray restarts it), given the served version again and
        asked again; after `retries` attempts the query fails with an error naming the shard,
        never with a silently shorter top-k.
        """
        from indexer.shards import drop_excluded, exclusion_extra, merge_topk

        served = self.current
        if served is None:
            raise RuntimeError("shard service: no index version loaded yet")
        kk = k + exclusion_extra(exclude)
        t0, failed = time.perf_counter(), []
        for attempt in range(self.retries + 1):
            results = await asyncio.gather(*[s.search.remote(queries, kk, served.version) for s in self.shards],
                                           return_exceptions=True)
            bad = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
            if not bad:
                break
            for i in bad:
                if not isinstance(results[i], SHARD_FAILURES):
                    raise results[i]
            failed += bad
            if attempt == self.retries:
                raise RuntimeError(f"shard service: shard(s) {bad} failed {self.retries + 1} times "
                                   f"(last: {results[bad[0]]!r}); refusing to answer from fewer shards")
            await self._reload(bad, served)
        if failed:
            self.recoveries.append({"shards": sorted(set(failed)), "seconds": time.perf_counter() - t0})
        scores, ids = drop_excluded(*merge_topk(results, kk), exclude, k)
        return scores, ids, served.version, served.checkpoint_step

    async def _reload(self, shards: list[int], served: ServedVersion) -> None:
        """Give restarted shards the served version (they come back with CURRENT, maybe newer)."""
        for i in shards:
            try:
                await asyncio.wait_for(self.shards[i].load.remote(served.path), self.retry_timeout_s)
            except (asyncio.TimeoutError, *SHARD_FAILURES):
                await asyncio.sleep(0.5)

    def shard_pids(self) -> list[int]:
        return ray.get([s.pid.remote() for s in self.shards])

    def recovery_log(self) -> list[dict]:
        return self.recoveries

    def status(self) -> dict | None:
        if self.current is None:
            return None
        m = self.current.manifest
        return {"version": m["version"], "checkpoint_step": m["checkpoint_step"], "rows": m["rows"],
                "doc_encoder_id": m.get("doc_encoder_id", ""), "refresh_seconds": m.get("refresh_seconds"),
                "blocks_per_s": m.get("blocks_per_s")}


# ---- embedding workers -------------------------------------------------------------------------


@ray.remote
class EmbeddingWorker:
    """Embeds a slice of blocks (memory-mapped Arrow store) with a published doc encoder and
    writes it into a version's staging directory, atomically."""

    def __init__(self, run_dir: str, threads: int, batch_size: int, device: str):
        import torch

        from core.logs import setup_logging
        from indexer.blocks import BlockStore
        from indexer.tokenizer import Vocab, load_tokenizer

        setup_logging()
        if threads > 0:
            torch.set_num_threads(threads)
        self.store = BlockStore(Path(run_dir) / "blocks")
        self.pad = Vocab(load_tokenizer(self.store.vocab_file)).pad
        self.batch_size, self.device = batch_size, device
        self.loaded, self.tower = None, None

    def embed_slice(self, published_dir: str, staging_dir: str, slice_index: int, start: int, end: int) -> dict:
        from indexer.embed import embed_blocks
        from indexer.versions import IndexVersions
        from trainer.checkpoint import load_doc_tower

        t0 = time.perf_counter()
        if self.loaded != published_dir:
            self.tower, _ = load_doc_tower(published_dir)
            self.tower.to(self.device)
            self.loaded = published_dir
        emb = embed_blocks(self.tower, self.store, start, end, self.batch_size, self.device, progress=False,
                           pad_id=self.pad)
        IndexVersions.write_slice(Path(staging_dir), slice_index, start, emb)
        return {"slice": slice_index, "rows": end - start, "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()


# ---- trainers ----------------------------------------------------------------------------------


class ServiceIndex:
    """The cluster's `trainer.index_client.IndexClient`: top-k from
    the shard service; a refresh is only a publish, plus a wait when the index falls more than
    `refresh.max_staleness` steps behind, or always in `refresh.mode=sync` (the baseline)."""

    def __init__(self, service, run, model, run_id: str, start_step: int, rank: int, initial_id: str):
        cfg = run.cfg
        self.service, self.run, self.run_id, self.rank = service, run, run_id, rank
        self.every, self.total, self.mode = cfg.refresh.every_steps, cfg.pretrain.steps, cfg.refresh.mode
        self.max_staleness, self.wait_timeout_s = cfg.refresh.max_staleness, cfg.refresh.wait_timeout_s
        self.frozen_steps = cfg.pretrain.freeze_retriever_steps
        self.version, self.checkpoint_step, self.stats = -1, -1, {}
        # Start from the served index if this model's doc encoder (or, async, an earlier one of this
        # run within the staleness bound) built it; else publish and wait. Sync insists on the exact
        # one, so that a resumed run sees the index the uninterrupted run saw.
        status = ray.get(service.status.remote())
        own_ids = {f"{run_id}-{start_step}"} | ({initial_id} if start_step == 0 and initial_id else set())
        served = status["doc_encoder_id"] if status else None
        ours = served in own_ids or (self.mode == "async" and served is not None and served.startswith(run_id))
        if not ours or self.staleness(start_step, status["checkpoint_step"]) > self.max_staleness:
            if rank == 0:
                self.publish(model, start_step)
            self._wait_for(start_step)
        else:
            self._note(status)

    def publish(self, model, step: int) -> None:
        from trainer.checkpoint import save_doc_tower

        save_doc_tower(model.retriever.doc_tower, self.run.dir / "published" / f"step_{step}", step,
                       extra={"doc_encoder_id": f"{self.run_id}-{step}"})

    def _note(self, status: dict) -> None:
        self.version, self.checkpoint_step = status["version"], status["checkpoint_step"]
        self.stats = {"refresh_seconds": status["refresh_seconds"], "refresh_blocks_per_s": status["blocks_per_s"]}

    def _wait_for(self, min_checkpoint_step: int) -> float:
        t0 = time.perf_counter()
        while True:
            status = ray.get(self.service.status.remote())
            if status is not None and status["checkpoint_step"] >= min_checkpoint_step:
                self._note(status)
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > self.wait_timeout_s:
                raise RuntimeError(f"the index has not reached checkpoint step {min_checkpoint_step} after "
                                   f"{self.wait_timeout_s:.0f} s (refresh.wait_timeout_s); refresh errors are "
                                   f"in {self.run.dir / 'events.jsonl'} (job 'refresh')")
            time.sleep(0.05)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
        scores, ids, self.version, self.checkpoint_step = ray.get(self.service.search.remote(queries, k, exclude))
        return scores, ids

    def staleness(self, step: int, index_step: int) -> int:
        from trainer.index_client import index_staleness

        return index_staleness(step, index_step, self.frozen_steps)

    def before_step(self, step: int) -> float:
        if self.staleness(step, self.checkpoint_step) <= self.max_staleness:
            return 0.0
        return self._wait_for(step - self.max_staleness)

    def after_step(self, model, step: int) -> float:
        from trainer.index_client import refresh_due

        if not refresh_due(step, self.every, self.total, self.frozen_steps):
            return 0.0
        t0 = time.perf_counter()
        if self.rank == 0:
            self.publish(model, step)
        if self.mode == "sync":
            self._wait_for(step)
        return time.perf_counter() - t0


@ray.remote
class TrainerWorker:
    """One data-parallel rank: DeepSpeed engine around the REALM model, the shared train loop."""

    def __init__(self, cfg, rank: int, world: int):
        from core.logs import setup_logging

        setup_logging(rank=rank)
        self.cfg, self.rank, self.world = cfg, rank, world

    def endpoint(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0's torch.distributed rendezvous."""
        return ray.util.get_node_ip_address(), free_port()

    def train(self, master: tuple[str, int, str | None], service) -> dict:
        from trainer.engine import DeepSpeedEngine, init_distributed
        from trainer.metrics import MetricsLogger
        from trainer.pretrain import build_optimizer_groups, setup, train_loop
        from trainer.run import pick_device

        cfg, cc = self.cfg, self.cfg.cluster
        on_gpu = pick_device(cfg).type == "cuda"
        backend = cc.dist_backend if cc.dist_backend != "auto" else ("nccl" if on_gpu else "gloo")
        init_distributed(self.rank, self.world, *master[:2], backend, store_file=master[2])
        run, model, meta = setup(cfg)
        initial_id = meta.get("doc_encoder_id", "")
        bf16 = cc.bf16 == "true" or (cc.bf16 == "auto" and on_gpu)
        p = cfg.pretrain
        engine = DeepSpeedEngine(model, build_optimizer_groups(model, cfg), p.steps, p.warmup_steps, p.grad_clip,
                                 p.batch_size // self.world, self.world, cc.zero_stage, bf16)
        metrics = MetricsLogger(run.dir, "pretrain", cfg) if self.rank == 0 else None
        try:
            def make_index(m, run_id: str, start: int) -> ServiceIndex:
                return ServiceIndex(service, run, m, run_id, start, self.rank, initial_id)

            return train_loop(run, engine.module, engine, make_index, metrics, self.rank, self.world,
                              init=meta.get("stage", ""))
        finally:
            if metrics is not None:
                metrics.close()

    def pid(self) -> int:
        return os.getpid()
