"""The refresh coordinator: newest published doc encoder -> slices -> embedding workers ->
commit a new index version -> swap it into the shard service.

It polls `run_dir/published/` (a directory appears there only complete, by rename), so it
needs no message from the trainers and survives their restarts. Intermediate checkpoints
published while a refresh runs are skipped: the next refresh takes the newest. A slice whose
worker dies is handed to the next worker (Ray restarts the dead one); the version is committed
only when every slice is in, so no reader ever sees a partial index.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from core.logs import setup_logging
from indexer.shards import shard_bounds
from indexer.versions import IndexVersions
from trainer.checkpoint import step_dirs
from trainer.metrics import MetricsLogger

log = logging.getLogger(__name__)


@ray.remote
class RefreshCoordinator:
    def __init__(self, run_dir: str, workers: list, service, num_slices: int, keep_versions: int,
                 poll_seconds: float, max_attempts: int = 3):
        setup_logging()
        self.run_dir = Path(run_dir)
        self.versions = IndexVersions(self.run_dir / "index")
        self.workers, self.service = workers, service
        self.num_slices, self.keep, self.poll = num_slices, keep_versions, poll_seconds
        self.max_attempts = max_attempts
        self.last_step, self.running = -1, False
        self.history: list[dict] = []
        self.log = MetricsLogger(self.run_dir, "refresh")

    async def start(self) -> dict | None:
        """Serve CURRENT (if any) before the trainers ask; returns the service status."""
        current = self.versions.current()
        if current is None:
            return None
        status = await self.service.swap.remote(str(current.path))
        self.last_step = current.checkpoint_step
        return status

    async def run(self) -> None:
        """Refresh whenever a newer doc encoder is published, until `stop`."""
        self.running = True
        while self.running:
            published = step_dirs(self.run_dir / "published")
            if published and published[-1][0] > self.last_step:
                step, path = published[-1]
                try:
                    await self.refresh(step, path)
                except Exception as e:  # a damaged publish must not stop later refreshes
                    self.last_step = step
                    self.log.log(step, error=f"{type(e).__name__}: {e}"[:500])
                    log.error("refresh of %s failed, skipped: %s: %s", path, type(e).__name__, e)
            else:
                await asyncio.sleep(self.poll)

    async def refresh(self, step: int, published: Path) -> dict:
        t0 = time.perf_counter()
        doc_encoder_id = json.loads((published / "realm.json").read_text()).get("doc_encoder_id", "")
        rows = self._rows()
        version = self.versions.next_version()
        staging = self.versions.staging_dir(version)
        reassigned = await asyncio.gather(*[
            self._embed(i, str(published), str(staging), lo, hi)
            for i, (lo, hi) in enumerate(shard_bounds(rows, self.num_slices))])
        seconds = time.perf_counter() - t0
        v = self.versions.commit(version, step, self.num_slices, rows, extra={
            "doc_encoder_id": doc_encoder_id, "refresh_seconds": seconds, "blocks_per_s": rows / seconds})
        await self.service.swap.remote(str(v.path))
        swapped = time.perf_counter() - t0
        self.last_step = step
        self.versions.gc(self.keep)
        for s, old in step_dirs(self.run_dir / "published"):
            if s < step:
                shutil.rmtree(old, ignore_errors=True)
        record = {"version": version, "checkpoint_step": step, "embed_seconds": seconds, "swap_seconds": swapped,
                  "blocks_per_s": rows / seconds, "slices_reassigned": sum(reassigned)}
        self.history.append(record)
        self.log.log(step, **record)
        return record

    async def _embed(self, i: int, published: str, staging: str, start: int, end: int) -> int:
        """Embed slice i, moving to the next worker when one dies; returns how often it moved."""
        for attempt in range(self.max_attempts):
            worker = self.workers[(i + attempt) % len(self.workers)]
            try:
                await worker.embed_slice.remote(published, staging, i, start, end)
                return attempt
            except RayActorError:
                continue
        raise RuntimeError(f"refresh: slice {i} [{start}, {end}) failed on {self.max_attempts} workers")

    def _rows(self) -> int:
        manifest = json.loads((self.run_dir / "blocks" / "manifest.json").read_text())
        return int(manifest["num_blocks"])

    def worker_pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])

    def stop(self) -> list[dict]:
        self.running = False
        self.log.close()
        return self.history
