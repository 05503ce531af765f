"""Where a training stage's model comes from: a fresh REALM from `model.init` (with the projection
optionally fitted to the corpus by PCA), or the ICT checkpoint for pre-training."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import InputError
from indexer.embed import encode_blocks
from trainer.bert import bert_factory
from trainer.checkpoint import load_model
from trainer.config import TrainConfig
from trainer.model import REALM, build_realm, pca_projection
from trainer.run import Run

log = logging.getLogger(__name__)


def fresh_model(cfg: TrainConfig, vocab_size: int) -> REALM:
    """Three BERTs from `model.init` (one load, two copies)."""
    m = cfg.model
    make_bert = bert_factory(m.init, vocab_size, m.hidden_size, m.num_heads, m.intermediate_size)
    try:
        return build_realm(make_bert, m.retriever_layers, m.reader_layers, m.retrieval_dim, m.pooling, m.reader_head,
                           m.copy_layer, m.copy_init)
    except ValueError as e:  # a copy_layer past the init's layers (model.reader_layers=0 keeps them all)
        raise InputError(f"config key 'model.copy_layer': {e}") from None


@torch.no_grad()
def pooled_sample(run: Run, tower, n: int) -> torch.Tensor:
    """The tower's pooled (pre-projection) outputs for `n` blocks drawn at random: [n, hidden] float32."""
    rng = np.random.default_rng(run.cfg.seed)
    ids = rng.choice(len(run.store), size=min(n, len(run.store)), replace=False)
    was_training = tower.training
    tower.eval()
    out = encode_blocks(tower.pooled, run.store, ids, 16, run.device, run.vocab.pad)
    tower.train(was_training)
    return torch.from_numpy(out)


def init_projection(run: Run, model: REALM) -> None:
    """`model.proj_init=pca`: both towers' projections from the corpus (pca_projection), so that the
    retriever starts as the init's own embeddings compared by cosine instead of through a random map."""
    m = run.cfg.model
    if m.proj_init != "pca":
        return
    t0 = time.time()
    pooled = pooled_sample(run, model.retriever.doc_tower, m.proj_init_blocks)
    weight = pca_projection(pooled, m.retrieval_dim, m.proj_init_scale ** 0.5)
    model.retriever.set_projection(weight.to(run.device))
    x = F.normalize(pooled.double(), dim=-1)
    kept = float((x @ weight.double().T).square().sum() / (m.proj_init_scale * len(x)))
    log.info("projection: PCA of %d blocks keeps %.1f%% of the normalized vectors' energy in %d dims (%.0f s)",
             len(pooled), 100 * kept, m.retrieval_dim, time.time() - t0)


def new_model(run: Run) -> REALM:
    """A fresh model on the run's device, its projection initialized as `model.proj_init` says."""
    model = fresh_model(run.cfg, run.vocab.size).to(run.device)
    init_projection(run, model)
    return model


def initial_model(run: Run) -> tuple[REALM, dict]:
    """Pre-training's start: the ICT model (its metadata: stage, doc_encoder_id), else (none, or
    `pretrain.init=raw`) a fresh one; `pretrain.null_document` set on it."""
    model, meta = _initial_model(run)
    model.null_document = run.cfg.pretrain.null_document
    return model, meta


def _initial_model(run: Run) -> tuple[REALM, dict]:
    ict_dir = run.dir / "models" / "ict"
    if run.cfg.pretrain.init == "raw":
        log.info("pretrain.init=raw: the retriever starts from model.init, not ICT's model")
        return new_model(run), {"stage": run.cfg.model.init}
    if ict_dir.is_dir():
        model, meta = load_model(ict_dir)
        m = run.cfg.model  # the reader's head is pre-training's, not ICT's
        try:
            model.reader.use_head(m.reader_head, m.copy_layer, m.copy_init)
        except ValueError as e:
            raise InputError(f"config key 'model.copy_layer': {e}") from None
        return model.to(run.device), meta
    log.warning("no ICT checkpoint in the run directory; starting from model.init without a warm retriever "
                "(REALM may get no retrieval signal: run `launch.py ict` first)")
    return new_model(run), {"stage": run.cfg.model.init}
