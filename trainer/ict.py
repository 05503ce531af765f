"""`launch.py ict`: the Inverse Cloze Task warm start (ORQA): a sentence retrieves its own block
among in-batch negatives. Writes models/ict and the index its doc encoder builds."""
from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import torch
import torch.nn.functional as F

from trainer import data as D
from trainer.checkpoint import save_model
from trainer.config import TrainConfig
from trainer.engine import TorchEngine, param_groups
from trainer.index_client import refresh_index
from trainer.metrics import MetricsLogger
from trainer.model_init import new_model
from trainer.run import Run

log = logging.getLogger(__name__)


def ict(cfg: TrainConfig) -> dict:
    run = Run.open(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = new_model(run)
    retriever = model.retriever
    c = cfg.ict
    engine = TorchEngine(param_groups(list(retriever.named_parameters()), c.lr, c.lr * 20,
                                      ("query_tower.proj", "doc_tower.proj")), c.steps, c.warmup_steps)
    metrics = MetricsLogger(run.dir, "ict", cfg)
    retriever.train()
    t0 = time.time()
    for step in range(1, c.steps + 1):
        q_ids, q_mask, c_ids, c_mask = (t.to(run.device) for t in D.ict_batch(
            run.store, run.tok, run.vocab, c.batch_size, rng, c.keep_sentence_prob, c.max_query_len,
            c.min_sentence_chars))
        scores = retriever.embed_queries(q_ids, q_mask) @ retriever.embed_docs(c_ids, c_mask).T
        labels = torch.arange(len(scores), device=scores.device)
        loss = F.cross_entropy(scores.float(), labels)
        norm = engine.step(loss)
        if step % c.log_every == 0 or step == c.steps:
            acc = float((scores.argmax(-1) == labels).float().mean())
            metrics.log(step, loss=loss.item(), in_batch_accuracy=acc, grad_norm=norm, elapsed=time.time() - t0)
            log.info("ict step %d/%d loss %.3f in-batch acc %.2f", step, c.steps, loss.item(), acc)
    doc_encoder_id = uuid.uuid4().hex
    save_model(model, run.dir / "models" / "ict", step=0, extra={"doc_encoder_id": doc_encoder_id, "stage": "ict"})
    refresh_index(run, model, 0, doc_encoder_id)
    metrics.close()
    return {"steps": c.steps, "seconds": time.time() - t0}
