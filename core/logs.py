"""Logging for every command and actor: one format, levels, and only rank 0's INFO on a cluster.

Progress and notes go through `logging.getLogger(__name__)` to stderr; a command's result (a JSON
summary, the metrics, an answer) is what launch.py prints to stdout. On a data-parallel cluster
every rank runs the same loop, so ranks other than 0 log warnings and errors only.
"""
from __future__ import annotations

import logging
import sys

PACKAGES = ("core", "indexer", "trainer", "cluster", "bench", "launch")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RankZeroFilter(logging.Filter):
    """Drop records below WARNING on every rank but 0."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a Ray worker's redirected stream)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(rank: int = 0) -> None:
    """Send our packages' records to stderr in FORMAT (idempotent: a second call replaces the handler)."""
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(RankZeroFilter(rank))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.handlers = [handler]
        logger.propagate = False
