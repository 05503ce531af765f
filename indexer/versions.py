"""Index versions: staged slices -> committed `vNNNN/` directory -> `CURRENT` pointer.

    index/.staging-v0003/slice_000.npy ...   written by embedding workers (each slice atomic)
    index/v0003/manifest.json                version, checkpoint_step, rows, dim, slices + sha256
    index/CURRENT                            "v0003"  (moved only after the version is complete)

A version directory appears only by renaming a complete staging directory, so a reader never
sees a half-written index; `CURRENT` is replaced atomically, so a reader sees old or new.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import InputError
from core.files import atomic_write_bytes, fsync_tree, sha256_file, verify_manifest, write_manifest


@dataclass(frozen=True)
class IndexVersion:
    version: int
    path: Path
    checkpoint_step: int
    rows: int
    dim: int
    slices: tuple  # ((file, start, rows), ...)


def _name(version: int) -> str:
    return f"v{version:04d}"


class IndexVersions:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- writers -------------------------------------------------------------------------
    def next_version(self) -> int:
        existing = [v for v, _ in self._committed()]
        staged = [int(m.group(1)) for p in self.root.glob(".staging-v*")
                  if (m := re.fullmatch(r"\.staging-v(\d+)", p.name))]
        return max(existing + staged, default=0) + 1

    def staging_dir(self, version: int) -> Path:
        d = self.root / f".staging-{_name(version)}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @staticmethod
    def write_slice(staging: Path, index: int, start: int, embeddings: np.ndarray) -> Path:
        """One slice, `[rows, dim]` float32/float16, written atomically as slice_NNN.npy."""
        import io

        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(embeddings))
        path = staging / f"slice_{index:03d}.npy"
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_bytes(staging / f"slice_{index:03d}.json",
                           json.dumps({"start": int(start), "rows": int(len(embeddings))}).encode())
        return path

    def commit(self, version: int, checkpoint_step: int, num_slices: int, total_rows: int,
               extra: dict | None = None, move_current: bool = True) -> IndexVersion:
        """Verify every slice is staged and contiguous, write the manifest, rename, move CURRENT (unless
        `move_current` is False: a corpus edit commits the version with its block store, through the run's
        CORPUS pointer, indexer/corpus_versions.py)."""
        staging = self.root / f".staging-{_name(version)}"
        slices, expect, dim = [], 0, None
        for i in range(num_slices):
            info_path = staging / f"slice_{i:03d}.json"
            if not info_path.is_file():
                raise InputError(f"{staging}: slice {i} missing, version {version} not complete")
            info = json.loads(info_path.read_text())
            if info["start"] != expect:
                raise InputError(f"{staging}: slice {i} starts at row {info['start']}, expected {expect}")
            arr = np.load(staging / f"slice_{i:03d}.npy", mmap_mode="r")
            dim = arr.shape[1] if dim is None else dim
            if arr.shape != (info["rows"], dim):
                raise InputError(f"{staging}: slice {i} has shape {arr.shape}, expected ({info['rows']}, {dim})")
            slices.append({"file": f"slice_{i:03d}.npy", "start": expect, "rows": info["rows"]})
            expect += info["rows"]
        if expect != total_rows:
            raise InputError(f"{staging}: slices cover {expect} rows, corpus has {total_rows}")
        for i in range(num_slices):
            (staging / f"slice_{i:03d}.json").unlink()
        meta = {"kind": "index_version", "version": version, "checkpoint_step": checkpoint_step,
                "rows": total_rows, "dim": int(dim or 0), "slices": slices, "created": time.time(), **(extra or {})}
        write_manifest(staging, meta)
        fsync_tree(staging)
        final = self.root / _name(version)
        os.replace(staging, final)
        if move_current:
            self.move_current(version)
        return self._version(final, meta)

    def move_current(self, version: int) -> None:
        atomic_write_bytes(self.root / "CURRENT", _name(version).encode())

    def publish(self, embeddings: np.ndarray, checkpoint_step: int, extra: dict | None = None,
                move_current: bool = True) -> IndexVersion:
        """Single-process path: one slice, committed at once."""
        version = self.next_version()
        self.write_slice(self.staging_dir(version), 0, 0, embeddings)
        return self.commit(version, checkpoint_step, 1, len(embeddings), extra, move_current)

    def extend(self, old: IndexVersion, embeddings: np.ndarray, extra: dict | None = None,
               move_current: bool = True) -> IndexVersion:
        """A new version: `old`'s rows (its slice files hard-linked, not re-embedded) then `embeddings`
        [n, dim] as rows len(old).. (a corpus edit's appended blocks). The new manifest vouches for the
        linked rows, so check `old` first (`open(old.path, verify=True)`)."""
        version = self.next_version()
        staging = self.staging_dir(version)
        try:
            for i, (file, start, rows) in enumerate(old.slices):
                name = f"slice_{i:03d}.npy"
                try:  # a committed slice is never written again (writes replace by rename): safe to share
                    os.link(old.path / file, staging / name)
                except OSError:
                    shutil.copy2(old.path / file, staging / name)
                atomic_write_bytes(staging / f"slice_{i:03d}.json",
                                   json.dumps({"start": int(start), "rows": int(rows)}).encode())
            n = len(old.slices)
            if len(embeddings):
                self.write_slice(staging, n, old.rows, embeddings)
                n += 1
            return self.commit(version, old.checkpoint_step, n, old.rows + len(embeddings), extra, move_current)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def remove(self, version: int) -> None:
        """Drop a committed version that was never made current (a corpus edit that failed after it)."""
        shutil.rmtree(self.root / _name(version), ignore_errors=True)

    def gc(self, keep: int = 2, protect: tuple[int, ...] = ()) -> None:
        """Remove all but the newest `keep` versions (never CURRENT, nor a version in `protect`: the one
        the run's CORPUS pointer pairs with its block store) and stale staging dirs."""
        current = self.current()
        committed = self._committed()
        for v, path in committed[:-keep] if keep > 0 else committed:
            if (current is None or v != current.version) and v not in protect:
                shutil.rmtree(path, ignore_errors=True)
        newest = committed[-1][0] if committed else 0
        for p in self.root.glob(".staging-v*"):
            m = re.fullmatch(r"\.staging-v(\d+)", p.name)
            if m and int(m.group(1)) <= newest:
                shutil.rmtree(p, ignore_errors=True)

    # ---- readers -------------------------------------------------------------------------
    def _committed(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = re.fullmatch(r"v(\d+)", p.name)
            if m and (p / "manifest.json").is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def versions(self) -> list[int]:
        return [v for v, _ in self._committed()]

    @staticmethod
    def _version(path: Path, meta: dict) -> IndexVersion:
        return IndexVersion(meta["version"], path, meta["checkpoint_step"], meta["rows"], meta["dim"],
                            tuple((s["file"], s["start"], s["rows"]) for s in meta["slices"]))

    def current(self) -> IndexVersion | None:
        pointer = self.root / "CURRENT"
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not re.fullmatch(r"v\d+", name) or not (path / "manifest.json").is_file():
            raise InputError(f"{pointer}: points to '{name}', which is not a complete index version")
        return self.open(path)

    @staticmethod
    def read_manifest(path: str | os.PathLike) -> dict:
        """A committed version's manifest (files present with their sizes; hashes are checked
        by `load_rows`, where the rows are read)."""
        return verify_manifest(path, check_hashes=False)

    def find(self, store_version: int | None = None, **fields) -> IndexVersion | None:
        """The newest committed version whose manifest has all of `fields` (e.g. doc_encoder_id=...) and,
        when given, embeds that block-store version (0, the store `prepare` wrote, for a version without
        the field)."""
        for _, path in reversed(self._committed()):
            meta = self.read_manifest(path)
            if store_version is not None and meta.get("store_version", 0) != store_version:
                continue
            if all(meta.get(k) == v for k, v in fields.items()):
                return self._version(path, meta)
        return None

    def open(self, path: str | os.PathLike, verify: bool = False) -> IndexVersion:
        meta = verify_manifest(path, check_hashes=verify)
        if meta.get("kind") != "index_version":
            raise InputError(f"{path}: not an index version")
        return self._version(Path(path), meta)

    @staticmethod
    def load_rows(v: IndexVersion, start: int = 0, end: int | None = None) -> np.ndarray:
        """Rows [start, end) of a version as float32, reading only the slices that overlap."""
        end = v.rows if end is None else end
        manifest = json.loads((v.path / "manifest.json").read_text())
        parts = []
        for file, s_start, s_rows in v.slices:
            lo, hi = max(start, s_start), min(end, s_start + s_rows)
            if lo >= hi:
                continue
            path = v.path / file
            info = manifest["files"][file]
            if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                raise InputError(f"{path}: truncated or corrupt embedding slice (manifest mismatch)")
            arr = np.load(path, mmap_mode="r")
            parts.append(np.asarray(arr[lo - s_start:hi - s_start], dtype=np.float32))
        if not parts:
            return np.empty((0, v.dim), dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
