"""`launch.py update-corpus changes=FILE` and `launch.py reindex data.corpus=NEW`: a new block-store version
embedded by the run's trained doc encoder and committed with its index version as one pair, no training.

The doc encoder is the one the QA model reads with (`eval.model`, auto: models/qa, else realm, ict): the
encoder of the index `QASystem` opens for it (`index_for_model`: the stored version built by its
doc_encoder_id). update-corpus embeds only the appended blocks, with the same code as every refresh
(`embed_store`), and links the unchanged rows from that index; reindex embeds a whole new corpus.
Nothing is current until the CORPUS pointer names the new pair (indexer/corpus_versions.py); a failure
before that removes what this command wrote, and the old pair stays current.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from core.errors import InputError
from core.files import exclusive_lock
from indexer.blocks import BlockStore, build_block_store
from indexer.corpus_versions import build_edited_store, next_store_dir, read_changes, read_pointer, write_pointer
from indexer.versions import IndexVersion
from trainer.checkpoint import load_model
from trainer.config import TrainConfig
from trainer.index_client import embed_store, index_for_model, index_tags, stored_version
from trainer.qa_system import resolve_qa_model_dir
from trainer.run import Run

log = logging.getLogger(__name__)


def _encoder_model(run: Run, cfg: TrainConfig):
    """The QA model (or the newest pre-trained one) whose doc encoder the edited index must share."""
    model_dir = resolve_qa_model_dir(run.dir, cfg.eval.model)
    model, meta = load_model(model_dir)
    if not meta.get("doc_encoder_id"):
        raise InputError(f"{model_dir}: the model names no doc encoder (doc_encoder_id); it cannot own an index")
    return model.to(run.device).eval(), meta, model_dir


def commit_new_pair(run: Run, store_dir: Path, store_version: int, build_store: Callable[[], dict],
                    make_index: Callable[[BlockStore], IndexVersion], doc_encoder_id: str
                    ) -> tuple[BlockStore, IndexVersion]:
    """Write the store version, then its index version, then move the CORPUS pointer to the pair. Until that
    one rename nothing here is read; on any failure before it both are removed (the old pair stays current)."""
    index = None
    try:
        build_store()
        store = BlockStore(store_dir, verify=True)
        index = make_index(store)
        write_pointer(run.dir, store_dir, store_version, index.version, doc_encoder_id)
    except BaseException:
        try:
            pointer = read_pointer(run.dir)
        except InputError:  # a damaged pointer names neither new version: undo ours, report the first error
            pointer = None
        if pointer is None or pointer.get("store_version") != store_version:  # not committed: undo
            if index is not None:
                run.versions.remove(index.version)
            shutil.rmtree(store_dir, ignore_errors=True)
        raise
    # CURRENT is for the Ray shard servers, which refuse an edited run; kept pointing at the newest pair anyway
    run.versions.move_current(index.version)
    run.versions.gc(run.cfg.refresh.keep_versions, (index.version,))
    return store, index


LOCK = ".corpus-edit.lock"


def update_corpus(cfg: TrainConfig) -> dict:
    """Apply a change file: only the changed documents are re-blocked and embedded."""
    if not cfg.changes.strip():
        raise InputError("config key 'changes': give the change file, e.g. changes=edits.jsonl (JSONL or Parquet: "
                         "{\"id\", \"title\", \"text\"} adds or replaces, {\"id\", \"delete\": true} deletes)")
    with _one_writer(cfg):
        return _update_corpus(cfg)


def reindex(cfg: TrainConfig) -> dict:
    """A whole new corpus (`data.corpus`) blocked like the run's and embedded by its trained doc encoder."""
    if not cfg.data.corpus.strip():
        raise InputError("config key 'data.corpus': give the new corpus, e.g. data.corpus=new.jsonl")
    with _one_writer(cfg):
        return _reindex(cfg)


def _one_writer(cfg: TrainConfig):
    """One writer at a time: two edits would derive from the same pair and pick the same version numbers."""
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "blocks").is_dir():  # before the lock file, which would create the directory
        raise InputError(f"{run_dir / 'blocks'}: no block store here (run `launch.py prepare` first)")
    return exclusive_lock(run_dir / LOCK, "another update-corpus or reindex")


def _update_corpus(cfg: TrainConfig) -> dict:
    t0 = time.time()
    run = Run.open(cfg)
    changes = read_changes(cfg.changes, run.store, cfg.data.max_doc_bytes)  # bad input fails before any work
    model, meta, model_dir = _encoder_model(run, cfg)
    doc_encoder_id = meta["doc_encoder_id"]
    old = stored_version(run, doc_encoder_id)
    if old is None:  # the model never read this store: build its index as QASystem would, then extend it
        index_for_model(run, model, meta)
        old = stored_version(run, doc_encoder_id)
    try:  # the new version links these rows and its manifest will vouch for them: check them before any write
        run.versions.open(old.path, verify=True)
    except InputError as e:
        raise InputError(f"{e} (in the index this edit extends; `launch.py reindex` rebuilds it)") from None
    version, store_dir = next_store_dir(run.dir)
    first_new = len(run.store)

    def make_index(store: BlockStore) -> IndexVersion:
        emb = embed_store(run, model, store, start=first_new)  # the appended blocks only
        return run.versions.extend(old, emb, extra={**index_tags(store, doc_encoder_id), "parent_index": old.version},
                                   move_current=False)

    store, index = commit_new_pair(
        run, store_dir, version,
        lambda: build_edited_store(run.store, store_dir, changes, version, cfg.blocks.max_title_len),
        make_index, doc_encoder_id)
    log.info("update-corpus: store v%d, index v%d: %d documents added or replaced, %d deleted, %d blocks embedded",
             version, index.version, len(changes.upserts), len(changes.deletes), len(store) - first_new)
    return {"store_version": version, "index_version": index.version, "added_or_replaced": len(changes.upserts),
            "deleted": len(changes.deletes), "blocks_embedded": len(store) - first_new, "blocks": len(store),
            "live_blocks": store.num_live, "model": str(model_dir), "seconds": round(time.time() - t0, 3)}


def _reindex(cfg: TrainConfig) -> dict:
    t0 = time.time()
    run = Run.open(cfg)
    model, meta, model_dir = _encoder_model(run, cfg)
    doc_encoder_id = meta["doc_encoder_id"]
    version, store_dir = next_store_dir(run.dir)
    # the run's vocabulary and block lengths: the token ids the encoders were trained on
    max_len = int(run.store.manifest["max_len"])
    max_title_len = int(run.store.manifest.get("max_title_len", cfg.blocks.max_title_len))

    def make_index(store: BlockStore) -> IndexVersion:
        return run.versions.publish(embed_store(run, model, store), meta.get("step", 0),
                                    extra=index_tags(store, doc_encoder_id), move_current=False)

    store, index = commit_new_pair(
        run, store_dir, version,
        lambda: build_block_store(cfg.data.corpus, store_dir, str(run.store.vocab_file), max_len, max_title_len,
                                  cfg.data.max_doc_bytes, extra={"store_version": version}),
        make_index, doc_encoder_id)
    log.info("reindex: store v%d, index v%d: %d blocks embedded", version, index.version, len(store))
    return {"store_version": version, "index_version": index.version, "blocks_embedded": len(store),
            "blocks": len(store), "live_blocks": store.num_live, "model": str(model_dir),
            "seconds": round(time.time() - t0, 3)}
