"""Where top-k comes from while training and evaluating, and when the corpus is re-embedded.

The training loop talks to an `IndexClient`: `StopTheWorldIndex` (here) re-embeds the corpus in
this process and blocks; `cluster.actors.ServiceIndex` asks the Ray shard service and only
publishes the doc encoder for the embedding workers. `index_staleness` and `refresh_due` are the
schedule both follow. Evaluation and fine-tuning read a stored version (`index_for_model`).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Protocol

import numpy as np
import torch

from indexer.approx import IndexSpec
from indexer.blocks import BlockStore
from indexer.embed import embed_blocks
from indexer.fusion import fuse
from indexer.lexical import LexicalIndex
from indexer.shards import ShardedIndex
from indexer.versions import IndexVersion, IndexVersions
from trainer import data as D
from trainer.run import Run


class IndexClient(Protocol):
    """What the training loop needs of an index."""

    version: int           # the index version the last search used
    checkpoint_step: int   # the training step whose doc encoder built it
    stats: dict            # refresh_seconds, refresh_blocks_per_s of the newest refresh

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [B, dim] float32 -> scores [B, k] float32, ids [B, k] int64; excluded ids never returned."""

    def before_step(self, step: int) -> float:
        """Seconds waited for a fresh enough index before `step`."""

    def after_step(self, model, step: int) -> float:
        """Publish or refresh when due after `step`; seconds the trainer was blocked."""


def index_staleness(step: int, index_step: int, frozen_steps: int) -> int:
    """Doc-encoder updates, at `step`, that an index built at `index_step` has not seen. The retriever
    does not move in its first `frozen_steps` steps, so an index built at any step up to then is as
    fresh as one built at `frozen_steps`: no refresh is needed (or waited for) before the tower moves."""
    return max(0, step - max(index_step, min(frozen_steps, step)))


def refresh_due(step: int, every: int, total: int, frozen_steps: int) -> bool:
    """Publish at every `every` steps, except at the end (the run's final model is published by the next
    stage) and while the retriever is frozen (the doc tower is still the one the index was built from)."""
    return step % every == 0 and frozen_steps < step < total


class CandidateSource:
    """A question's top-k block ids by `retrieval.mode`: dense (the model's index), bm25 (the store's BM25
    index, indexer.lexical) or hybrid (`retrieval.fusion` of both rankings, each read `fusion_depth` deep,
    indexer.fusion). Only the candidates change with the mode: p(z|x) over them is the model's own score, so
    the reader reads whatever the mode retrieves. Pre-training always searches the model's index."""

    def __init__(self, index, store: BlockStore, mode: str = "dense", fusion_depth: int = 100, rrf_k: float = 60.0,
                 fusion: str = "rrf", bm25_weight: float = 0.5):
        self.index, self.mode, self.fusion_depth, self.rrf_k = index, mode, fusion_depth, rrf_k
        self.fusion, self.bm25_weight = fusion, bm25_weight
        self.lexical = LexicalIndex(store.bm25_dir) if mode != "dense" else None

    @classmethod
    def for_run(cls, run: Run, index, mode: str | None = None) -> CandidateSource:
        """The run config's retrieval settings, with `mode` instead of retrieval.mode where given."""
        r = run.cfg.retrieval
        return cls(index, run.store, mode or r.mode, r.fusion_depth, r.rrf_k, r.fusion, r.bm25_weight)

    def search(self, emb: np.ndarray, texts: list[str], k: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """emb [B, dim] (the query tower's), texts [B] (the same queries as text) -> ids [B, k] int64, -1 padded;
        ids in `exclude` [B, E] (-1 = padding) never returned."""
        if self.mode == "dense":
            return self.index.search(emb, k, exclude)[1]
        if self.mode == "bm25":
            return self.lexical.search(texts, k, exclude)[1]
        depth = max(k, self.fusion_depth)
        return fuse(self.fusion, self.index.search(emb, depth, exclude), self.lexical.search(texts, depth, exclude),
                    k, self.bm25_weight, self.rrf_k)


@torch.no_grad()
def retrieve(model, source: CandidateSource | IndexClient, run: Run, queries: list[D.MaskedQuery], k: int
             ) -> np.ndarray:
    """Top-k candidate ids [B, k] for masked queries, exclusions applied: from the (possibly stale) training
    index, or from a `CandidateSource` (evaluation: retrieval.mode; the query's text is x without its mask)."""
    ids, mask = D.pad_batch([q.ids for q in queries], run.vocab.pad)
    emb = model.retriever.embed_queries(ids.to(run.device), mask.to(run.device)).float().cpu().numpy()
    exclude = D.exclusion_matrix(queries)
    if isinstance(source, CandidateSource):
        return source.search(emb, [run.tok.decode(q.ids.tolist(), skip_special_tokens=True) for q in queries], k,
                             exclude)
    return source.search(emb, k, exclude)[1]


def refresh_index(run: Run, model, step: int, doc_encoder_id: str) -> ShardedIndex:
    """Stop-the-world refresh: embed every block with the current doc encoder, publish, load."""
    emb = embed_store(run, model)
    v = run.versions.publish(emb, checkpoint_step=step, extra=index_tags(run.store, doc_encoder_id))
    run.versions.gc(run.cfg.refresh.keep_versions, run.pinned_index_versions())
    return ShardedIndex(emb, 1, v.version, step, dead=run.store.dead)


def embed_store(run: Run, model, store: BlockStore | None = None, start: int = 0) -> np.ndarray:
    """Blocks [start, end) of `store` (default: the run's) embedded by the model's doc tower: the one way
    blocks are embedded in one process (a refresh, a corpus edit, a reindex), so their rows match."""
    return embed_blocks(model.retriever.doc_tower, store or run.store, start=start, batch_size=64, device=run.device,
                        pad_id=run.vocab.pad, progress=sys.stderr.isatty())


def index_tags(store: BlockStore, doc_encoder_id: str) -> dict:
    """What an index version's manifest says it embeds: which doc encoder, and which store version (an
    unedited run's stores are version 0 and keep manifests without the field)."""
    return {"doc_encoder_id": doc_encoder_id, **({"store_version": store.version} if store.version else {})}


def stored_version(run: Run, doc_encoder_id: str) -> IndexVersion | None:
    """The newest committed index version of the run's store version built by this doc encoder."""
    v = run.versions.find(store_version=run.store.version, doc_encoder_id=doc_encoder_id) if doc_encoder_id else None
    return v if v is not None and v.rows == len(run.store) else None


def stored_index(run: Run, *doc_encoder_ids: str) -> ShardedIndex | None:
    """A committed index version built by one of these doc encoders (in that order of preference)."""
    for doc_encoder_id in filter(None, doc_encoder_ids):
        v = stored_version(run, doc_encoder_id)
        if v is not None:
            return ShardedIndex(IndexVersions.load_rows(v), 1, v.version, v.checkpoint_step, dead=run.store.dead)
    return None


def index_for_model(run: Run, model, meta: dict, spec: IndexSpec | None = None) -> ShardedIndex:
    """The stored index this model's doc encoder built, else a fresh one (published); searched as `spec` says
    (an approximate kind is built over the rows here; default exact)."""
    doc_encoder_id = meta.get("doc_encoder_id", "")
    index = stored_index(run, doc_encoder_id) or refresh_index(run, model, meta.get("step", 0), doc_encoder_id)
    return index if spec is None else index.with_spec(spec)


def index_spec(cfg) -> IndexSpec:
    """`index.*`: how inference (fine-tuning, evaluation, query, explain, serving) searches; never pre-training."""
    return IndexSpec(**dataclasses.asdict(cfg.index))


class StopTheWorldIndex:
    """The single-process IndexClient: every `refresh.every_steps` the trainer stops and re-embeds the corpus.

    At the start it reuses a stored version built by the same doc encoder (ICT's at step 0, this
    run's own at a resume step) instead of re-embedding the corpus.
    """

    def __init__(self, run: Run, model, run_id: str, start_step: int, initial_id: str = ""):
        self.run, self.run_id = run, run_id
        self.every, self.total = run.cfg.refresh.every_steps, run.cfg.pretrain.steps
        self.frozen_steps = run.cfg.pretrain.freeze_retriever_steps
        self.stats = {}
        self.index = stored_index(run, f"{run_id}-{start_step}", initial_id if start_step == 0 else "")
        if self.index is None:
            self._refresh(model, start_step)

    def _refresh(self, model, step: int) -> float:
        t0 = time.perf_counter()
        self.index = refresh_index(self.run, model, step, f"{self.run_id}-{step}")
        seconds = time.perf_counter() - t0
        self.stats = {"refresh_seconds": seconds, "refresh_blocks_per_s": self.index.rows / seconds}
        return seconds

    @property
    def version(self) -> int:
        return self.index.version

    @property
    def checkpoint_step(self) -> int:
        return self.index.checkpoint_step

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
        return self.index.search(queries, k, exclude)

    def before_step(self, step: int) -> float:
        return 0.0

    def after_step(self, model, step: int) -> float:
        if not refresh_due(step, self.every, self.total, self.frozen_steps):
            return 0.0
        return self._refresh(model, step)
