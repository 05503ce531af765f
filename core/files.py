"""The one place run files are written: `atomic_dir` / `atomic_write_bytes` write to a temporary
sibling, fsync and rename, so a reader (or a later run) never sees a half-written file or directory;
`write_manifest` / `verify_manifest` record and check every file's size and sha256.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import InputError


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that streams into it; on success fsync it and rename it
    to `path`, on any error remove it (readers see the old file or the whole new one)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir beside `path`; on success fsync it and rename it to `path`.

    On any error the temp dir is removed and `path` is untouched. Temp dirs start with '.tmp-'
    so listings of finished versions/checkpoints never match them.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{p.name}-", dir=p.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if p.exists():
            old = p.parent / f".old-{p.name}-{os.getpid()}"
            os.replace(p, old)
            os.replace(tmp, p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, p)
        _fsync_dir(p.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) or fail at once with an InputError naming
    `what` holds it. flock, not a marker file: the lock goes with the process, so a crash leaves none behind."""
    import fcntl

    p = Path(path)
    with open(p, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{p}: {what} is running on this run directory; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_manifest(directory: Path, meta: dict) -> None:
    """manifest.json listing every file in `directory` with its sha256, plus `meta`."""
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != "manifest.json":
            files[str(f.relative_to(directory))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    atomic_write_json(directory / "manifest.json", {**meta, "files": files})


def verify_manifest(directory: str | os.PathLike, check_hashes: bool = True) -> dict:
    """Load manifest.json and check every listed file exists with its size (and sha256)."""
    d = Path(directory)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise InputError(f"{d}: incomplete or foreign directory (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{mpath}: corrupt manifest: {e}") from None
    for name, info in manifest.get("files", {}).items():
        f = d / name
        if not f.is_file():
            raise InputError(f"{f}: missing (listed in {mpath})")
        if f.stat().st_size != info["bytes"]:
            raise InputError(f"{f}: truncated or changed ({f.stat().st_size} bytes, manifest says {info['bytes']})")
        if check_hashes and sha256_file(f) != info["sha256"]:
            raise InputError(f"{f}: checksum mismatch (corrupt file)")
    return manifest
