"""The one place user files are read: every defect becomes an `InputError` naming file:line."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from core.errors import InputError


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; errors name file:line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            obj = parse_jsonl_line(raw, f"{p}:{lineno}")
            if obj is not None:
                yield lineno, obj


def parse_jsonl_line(raw: bytes, where: str) -> dict | None:
    """One JSONL line as an object (None for a blank line); a defect is an InputError naming `where`."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def require_str(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise InputError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(f"{where}: field '{key}' is empty")
    return value


def optional_str(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Rows of a JSONL file, a Parquet file or a directory of Parquet files (read in name order) as
    (location, dict); location is 'file:line' or 'file:row N'. Streams: Parquet is read a record batch at a
    time, JSONL a line at a time, so no file is ever held whole."""
    files, jsonl = record_files(path)
    if jsonl:
        for lineno, obj in read_jsonl(files[0]):
            yield f"{files[0]}:{lineno}", obj
    else:
        for f in files:
            yield from _parquet_rows(f)


def record_files(path: str | os.PathLike) -> tuple[list[Path], bool]:
    """The files `read_records` reads, in its order (a directory's .parquet files by name), and whether they
    are JSONL (one file)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".parquet" and not f.name.startswith("."))
        if not files:
            raise InputError(f"{p}: a directory with no .parquet files")
        return files, False
    return [p], p.suffix != ".parquet"


PARQUET_BATCH_ROWS = 4096


def _parquet_rows(p: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    if not p.is_file():
        raise InputError(f"{p}: file not found")
    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{p}:row {i}", row
                i += 1
    except InputError:
        raise
    except Exception as e:  # pyarrow raises several types for damaged files
        raise InputError(f"{p}: not a readable Parquet file: {str(e).splitlines()[0]}") from None
