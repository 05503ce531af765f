"""Corpus versions: edited block stores and the one pointer that pairs a store version with its index.

    blocks/                  the store `prepare` wrote: store version 0
    store/v0002/             an edited (update-corpus) or rebuilt (reindex) store version, written whole
                             to a temporary sibling and renamed (core.files.atomic_dir)
    index/v0007/             its index version (indexer.versions), manifest field store_version=2
    CORPUS                   {"store": "store/v0002", "store_version": 2, "index": "v0007", ...}

`CORPUS` is the commit point: it is replaced atomically (temp file, fsync, rename) only after both
directories are complete, so a reader that follows it sees the old pair or the new pair; a run without
it (no edits) reads `blocks/` as before. An index version is also tagged with the store version it
embeds, so no reader can pair store v2 with an index of store v1 even by looking for one itself.

An edit keeps block ids stable: the previous version's Arrow segments are hard-linked (not copied), the
changed documents' blocks are appended as a new segment, and the blocks of replaced or deleted documents
are listed in `dead.npy` (never searched, never shown; an id is never reused).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.errors import InputError
from core.files import atomic_dir, atomic_write_json, write_manifest
from core.records import read_records, require_str
from indexer.blocks import BLOCK_SCHEMA, DOC_SCHEMA, BlockStore, Document, block_rows, read_batches, write_arrow
from indexer.lexical import BM25_COLUMNS, BM25_DIR, build_bm25
from indexer.tokenizer import Vocab, load_tokenizer

POINTER = "CORPUS"
STORES = "store"


@dataclass(frozen=True)
class Changes:
    """A validated change file: documents to add or replace, and ids to delete."""
    upserts: list[Document]
    deletes: list[str]


def read_changes(path: str | os.PathLike, store: BlockStore, max_doc_bytes: int) -> Changes:
    """`{"id", "title", "text"}` adds or replaces, `{"id", "delete": true}` deletes; any defect is an
    InputError naming file:line, raised before anything is written."""
    upserts, deletes, seen = [], [], {}
    live = set(store.doc_ids)
    for where, row in read_records(path):
        raw_id = row.get("id")
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            row = {**row, "id": str(raw_id)}  # as read_corpus: integer ids are read as strings
        doc_id = require_str(row, "id", where)
        if doc_id in seen:
            raise InputError(f"{where}: duplicate id '{doc_id}' (first at {seen[doc_id]}); one change per document")
        seen[doc_id] = where
        delete = row.get("delete")
        if delete is True:
            if doc_id not in live:
                raise InputError(f"{where}: unknown id '{doc_id}' to delete (no such document in the corpus)")
            deletes.append(doc_id)
            continue
        if delete not in (None, False):
            raise InputError(f"{where}: field 'delete' must be true, got {delete!r}")
        title = require_str(row, "title", where, allow_empty=True)
        text = require_str(row, "text", where)
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > max_doc_bytes:
            raise InputError(f"{where}: document '{doc_id}' is {size} bytes, over data.max_doc_bytes={max_doc_bytes}")
        upserts.append(Document(doc_id, title.strip(), text.strip()))
    if not seen:
        raise InputError(f"{path}: no changes (empty file)")
    if not live - set(deletes) and not upserts:
        raise InputError(f"{path}: the changes delete every document; nothing would be left to search")
    return Changes(upserts, deletes)


# ---- the pointer --------------------------------------------------------------------------------
def read_pointer(run_dir: str | os.PathLike) -> dict | None:
    """The committed pair, or None for a run that was never edited."""
    p = Path(run_dir) / POINTER
    if not p.is_file():
        return None
    try:
        pointer = json.loads(p.read_text(encoding="utf-8"))
        store = Path(run_dir) / pointer["store"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{p}: corrupt corpus pointer: {e}") from None
    if not (store / "manifest.json").is_file():
        raise InputError(f"{p}: points to '{pointer['store']}', which is not a complete block store")
    return pointer


def current_store_dir(run_dir: str | os.PathLike) -> Path:
    """The block store readers open: the pointer's, else `blocks/`."""
    pointer = read_pointer(run_dir)
    return Path(run_dir) / (pointer["store"] if pointer else "blocks")


def write_pointer(run_dir: str | os.PathLike, store_dir: Path, store_version: int, index_version: int,
                  doc_encoder_id: str) -> dict:
    """The commit point of a new pair: one atomic rename."""
    pointer = {"store": str(Path(store_dir).relative_to(run_dir)), "store_version": store_version,
               "index": f"v{index_version:04d}", "index_version": index_version, "doc_encoder_id": doc_encoder_id}
    atomic_write_json(Path(run_dir) / POINTER, pointer)
    return pointer


def reset_pointer(run_dir: str | os.PathLike) -> None:
    """`prepare` wrote a new `blocks/`: the run's store is version 0 again. The old store versions stay (and
    so keep their numbers taken), so no index tagged with one of them can ever match a later edit."""
    (Path(run_dir) / POINTER).unlink(missing_ok=True)


def next_store_dir(run_dir: str | os.PathLike) -> tuple[int, Path]:
    """A version number no store directory (complete or left by a crash) has had: ids are never reused."""
    root = Path(run_dir) / STORES
    used = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else [])
            if (m := re.fullmatch(r"(?:\.tmp-)?v(\d+)(?:-.*)?", p.name))]
    version = max(used, default=0) + 1
    return version, root / f"v{version:04d}"


# ---- writing a store version --------------------------------------------------------------------
def _link(src: Path, dst: Path) -> None:
    """Hard link (the file is never written again: every write replaces by rename), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_edited_store(prev: BlockStore, out_dir: Path, changes: Changes, version: int, max_title_len: int) -> dict:
    """prev + changes -> store version at out_dir (atomic). Unchanged blocks keep their ids and rows; the
    changed documents' blocks get ids from len(prev) on; replaced and deleted documents' blocks turn dead."""
    max_len = int(prev.manifest["max_len"])
    max_title_len = int(prev.manifest.get("max_title_len", max_title_len))
    segments = list(prev.manifest.get("segments", ["blocks.arrow"]))
    with atomic_dir(out_dir) as tmp:
        for name in [*segments, "vocab.txt"]:
            _link(prev.dir / name, tmp / name)
        tok = load_tokenizer(tmp / "vocab.txt")
        cols, new_docs = block_rows(tok, Vocab(tok), changes.upserts, max_len, max_title_len, first_id=len(prev))
        if cols["block_id"]:
            segment = f"blocks_{version:04d}.arrow"
            write_arrow(tmp / segment, pa.table(cols, schema=BLOCK_SCHEMA))
            segments.append(segment)
        gone = set(changes.deletes) | {d.doc_id for d in changes.upserts}
        dead = [prev.dead] + [np.arange(r.start, r.stop, dtype=np.int64)
                              for d in gone if (r := prev.doc_blocks(d))]
        dead = np.unique(np.concatenate(dead)).astype(np.int64)
        np.save(tmp / "dead.npy", dead)
        # BM25 statistics (document frequencies, lengths) are corpus-wide, so the new version's index is
        # built whole from its live blocks, read a record batch at a time from the (hard-linked) segments.
        build_bm25(read_batches([tmp / seg for seg in segments], BM25_COLUMNS), dead, tmp / BM25_DIR)
        kept = [e for e in prev.doc_entries() if e[0] not in gone]
        docs = {"doc_id": [d for d, _, _ in kept] + new_docs["doc_id"],
                "first_block": [f for _, f, _ in kept] + new_docs["first_block"],
                "num_blocks": [n for _, _, n in kept] + new_docs["num_blocks"]}
        write_arrow(tmp / "docs.arrow", pa.table(docs, schema=DOC_SCHEMA))
        meta = {"kind": "block_store", "store_version": version, "segments": segments,
                "num_blocks": len(prev) + len(cols["block_id"]), "num_docs": len(docs["doc_id"]),
                "max_len": max_len, "max_title_len": max_title_len, "corpus": prev.manifest.get("corpus", ""),
                "parent_store_version": prev.version, "added_or_replaced": len(changes.upserts),
                "deleted": len(changes.deletes)}
        write_manifest(tmp, meta)
    return meta
