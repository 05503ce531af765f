"""Ordered, bounded fan-out of a streaming job over worker processes (`prepare.workers`).

Results come back in input order whatever the number of workers, so whatever is written from them is the
same bytes; at most `window` chunks are in flight, so a corpus streamed through it is never held whole
(concurrent.futures' own `map` submits its whole input at once). Workers are spawned, not forked: the
parent has torch's and tokenizers' thread pools running, which a fork would copy mid-state.
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def ordered_map(fn: Callable[[Any], Any], chunks: Iterable[Any], workers: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """fn(chunk) for each chunk, in order; in this process when workers <= 1 (after `initializer`), else in
    `workers` spawned processes with at most 2 * workers chunks in flight."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for chunk in chunks:
            yield fn(chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def chunked(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive lists of n items (the last may be shorter), drawn lazily."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
