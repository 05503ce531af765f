"""The Open-QA service's core, plain Python: answers batches of questions and explains one, each wholly from
one committed corpus version, and swaps to a newer version without stopping.

Answering and explaining are `QASystem.predict` and `explain.explain_question`, the code `query`, `explain`
and `evaluate` run; this module adds only what a long-running service needs on top:

- **Versions.** A `ServedVersion` is a loaded QA system (model, store, index) with the numbers it reports.
  `update-corpus`/`reindex` commit a new store+index pair by renaming `run_dir/CORPUS`, and `finetune`
  renames a new model directory into place; `poll` notices either by a `stat` (cheap, so it runs between
  batches), loads the new pair fully in a background thread while the old one keeps answering, then switches
  with one reference assignment. A batch reads `self.current` once, so each answer comes from one version
  and reports it (`index_version`, `store_version`, `model`). A version that fails to load is logged and the
  old one kept.
- **Batches with their own k.** Questions of a batch that share k run as one `predict` call.
- **JSON shapes** of the HTTP API (README, "Serving").

No Ray here (import-linter: Ray lives in cluster/); cluster/serve.py wraps this in Ray Serve deployments.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError
from indexer.corpus_versions import POINTER
from trainer.config import TrainConfig
from trainer.explain import explain_question
from trainer.qa_system import QASystem, load_qa_system, resolve_qa_model_dir
from trainer.serve_requests import BadRequest, QARequest, check_k

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedVersion:
    """One loaded corpus version and model: never changed after loading, only replaced."""
    system: QASystem
    index_version: int
    store_version: int
    model: str      # the model directory, relative to the run directory when inside it
    stamp: tuple    # what `_stamp` read just before loading


def _stat(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size  # a rename (every commit here) changes the inode


class QAService:
    """Answers and explanations from the newest committed version of a run's corpus and QA model."""

    def __init__(self, cfg: TrainConfig, max_k: int, poll_seconds: float = 1.0):
        """`max_k`: the largest k a request may ask for (further capped by the corpus's live blocks)."""
        self.cfg, self.limit_k, self.poll_seconds = cfg, max_k, poll_seconds
        self.run_dir = Path(cfg.run_dir)
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._last_poll = time.monotonic()
        self._failed_stamp: tuple | None = None
        self.swaps = 0
        # what /v1/health reports: whether concurrent requests share batches
        self.answered = self.batches = self.largest_batch = 0
        self.current = self._load()

    # ---- versions --------------------------------------------------------------------------------
    def _model_dir(self) -> Path:
        return resolve_qa_model_dir(self.run_dir, self.cfg.eval.model)

    def _stamp(self) -> tuple:
        """The corpus pointer's and the model manifest's identity: changes exactly when either is committed."""
        try:
            model = _stat(self._model_dir() / "manifest.json")
        except InputError:  # no model directory any more: a change, which the load will report
            model = None
        return _stat(self.run_dir / POINTER), model

    def _load(self) -> ServedVersion:
        stamp = self._stamp()  # read first: a commit during the load differs from it, so the next poll sees it
        system = load_qa_system(self.cfg, self.cfg.eval.model)
        system.model.eval()
        model_dir = self._model_dir()
        try:
            model = str(model_dir.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:  # a model outside the run directory: its name, not where it lies on this host
            model = model_dir.name
        return ServedVersion(system, int(system.index.version), int(system.run.store.version), model, stamp)

    def poll(self, wait: bool = False) -> bool:
        """Start loading a newly committed version if there is one; True if a load started (or, with
        `wait`, finished). Rate-limited to one `stat` pair per `poll_seconds` unless `wait`."""
        now = time.monotonic()
        if not wait and now - self._last_poll < self.poll_seconds:
            return False
        self._last_poll = now
        stamp = self._stamp()
        if stamp == self.current.stamp or stamp == self._failed_stamp:
            return False
        with self._lock:
            if self._loader is not None and self._loader.is_alive():
                loader, started = self._loader, False
            else:
                loader = self._loader = threading.Thread(target=self._load_and_swap, name="qa-version-loader",
                                                         daemon=True)
                loader.start()
                started = True
        if wait:
            loader.join()
        return started or wait

    def _load_and_swap(self) -> None:
        old = self.current
        try:
            new = self._load()
        except Exception as e:  # a damaged or half-written pair: keep answering from the old one
            self._failed_stamp = self._stamp()
            log.error("serve: could not load the new corpus version (%s); still serving index v%d", e,
                      old.index_version)
            return
        self.current = new  # the swap: one reference assignment; batches already running keep `old`
        self.swaps += 1
        log.info("serve: now index v%d, store v%d, %s (was index v%d)", new.index_version, new.store_version,
                 new.model, old.index_version)

    @property
    def loading(self) -> bool:
        loader = self._loader
        return loader is not None and loader.is_alive()

    def max_k(self, served: ServedVersion | None = None) -> int:
        served = served or self.current
        return min(self.limit_k, served.system.run.store.num_live)

    # ---- answering -------------------------------------------------------------------------------
    def answer(self, requests: list[QARequest]) -> list[dict | BadRequest]:
        """One answer per request, all from the version current when the batch starts; a request whose k
        that version cannot serve gets its BadRequest in its place (the others are answered)."""
        served = self.current
        cfg = self.cfg.finetune
        out: list[dict | BadRequest | None] = [None] * len(requests)
        by_k: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            k = cfg.k if r.k is None else r.k
            try:
                check_k(k, self.max_k(served))
            except BadRequest as e:
                out[i] = e
                continue
            by_k.setdefault(k, []).append(i)
        for k, idx in by_k.items():
            preds = served.system.predict([requests[i].question for i in idx], k, cfg.max_answer_len)
            for i, pred in zip(idx, preds):
                out[i] = answer_json(served, requests[i].question, k, pred)
        self.batches += 1
        self.answered += len(requests)
        self.largest_batch = max(self.largest_batch, len(requests))
        return out

    def explain(self, request: QARequest) -> dict:
        """`launch.py explain question=...`'s explanation, from one version, with the version it used."""
        served = self.current
        k = self.cfg.finetune.k if request.k is None else request.k
        check_k(k, self.max_k(served))
        out = explain_question(served.system, request.question, k, self.cfg.finetune.max_answer_len)
        return {**out, "answer": out["prediction"], "k": k, **version_json(served)}

    def health(self) -> dict:
        served = self.current
        return {"status": "ok", **version_json(served), "retrieval_mode": served.system.source.mode,
                "loading": self.loading, "answered": self.answered,
                "batches": self.batches, "largest_batch": self.largest_batch}


def version_json(served: ServedVersion) -> dict:
    return {"index_version": served.index_version, "store_version": served.store_version, "model": served.model}


def answer_json(served: ServedVersion, question: str, k: int, pred: dict) -> dict:
    """The /v1/answer body: the answer, where it sits in its block (`evidence`: block id and char span of
    the block's text, for highlighting), and the top-k blocks with p(z|x) and their share of p(y|x)."""
    store = served.system.run.store
    blocks = [{"block_id": b, "doc_id": store.doc_id(b), "title": store.title(b), "text": store.text(b),
               "p_z": pred["p_z"][z], "share": pred["shares"][z]}
              for z, b in enumerate(pred["top_k"]) if b >= 0]
    found = pred["block_id"] >= 0
    return {"question": question, "answer": pred["prediction"], "probability": pred["probability"],
            "evidence": {"block_id": pred["block_id"], "char_span": pred["char_span"]} if found else None,
            "blocks": blocks, "k": k, **version_json(served)}
