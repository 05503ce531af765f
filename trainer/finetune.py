"""`launch.py finetune`: Open-QA fine-tuning of the query tower and a span reader over a fixed index.

The doc encoder and the index stay as pre-training left them (trainer/qa_system.py); questions
whose answer is in none of the top-k blocks are skipped (ORQA).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from trainer.checkpoint import save_model
from trainer.config import TrainConfig
from trainer.engine import TorchEngine, param_groups
from trainer.metrics import MetricsLogger
from trainer.model import span_marginal_log_likelihood
from trainer.qa import qa_file, read_qa
from trainer.qa_system import load_qa_system
from trainer.run import check_k

log = logging.getLogger(__name__)


def finetune(cfg: TrainConfig) -> dict:
    c = cfg.finetune
    train = read_qa(qa_file(cfg, "qa_train"))
    init = c.init if c.init != "auto" else ("realm" if (Path(cfg.run_dir) / "models" / "realm").is_dir() else "ict")
    torch.manual_seed(cfg.seed)
    system = load_qa_system(cfg, init)
    if c.early_k:
        check_k(c.early_k, system.run.store, "finetune.early_k")
    model = system.model.train()
    groups = param_groups(list(model.reader.named_parameters(prefix="reader")) +
                          list(model.span_head.named_parameters(prefix="span_head")), c.lr, c.head_lr, ("span_head",))
    groups.append({"params": list(model.retriever.query_tower.parameters()), "lr": c.retriever_lr})
    engine = TorchEngine(groups, c.steps, max(1, c.steps // 10), c.grad_clip)
    metrics = MetricsLogger(system.run.dir, "finetune", cfg)
    rng = np.random.default_rng(cfg.seed)
    t0, skipped = time.time(), 0
    for step in range(1, c.steps + 1):
        batch = [train[int(i)] for i in rng.integers(len(train), size=c.batch_size)]
        questions = [e.question for e in batch]
        embedded = system.embed_questions(questions)  # one query-tower pass for the reader's top-k and the early update
        scores, cand, span, qb = system.forward(questions, [[] if e.is_regex else e.answers for e in batch], c.k,
                                                c.max_answer_len, embedded=embedded)
        answer_mask = qb.answer_mask.to(span.device)
        ll = span_marginal_log_likelihood(scores, span, answer_mask)
        found = answer_mask.flatten(1).any(-1)  # ORQA: skip questions with no answer in the top-k
        skipped += int((~found).sum())
        losses = {"loss": -ll[found].mean()} if found.any() else {}
        if c.early_k:
            early, early_found = system.early_update_loss(embedded[1], questions, [e.answers for e in batch],
                                                          [e.is_regex for e in batch], c.early_k)
            if early is not None:
                losses["early_loss"] = early
        if losses:
            engine.step(sum(losses.values()))
        if step % c.log_every == 0 or step == c.steps:
            found_share = float(found.float().mean())
            logged = {name: float(v.detach()) for name, v in losses.items()}
            if c.early_k:
                logged["early_answer_found"] = early_found
            metrics.log(step, **{"loss": float("nan"), **logged}, answer_found=found_share, elapsed=time.time() - t0)
            log.info("finetune step %d/%d loss %.3f answer in top-%d %.2f%s", step, c.steps,
                     logged.get("loss", float("nan")), c.k, found_share,
                     f" early loss {logged.get('early_loss', float('nan')):.3f} answer in top-{c.early_k} "
                     f"{early_found:.2f}" if c.early_k else "")
    save_model(model, system.run.dir / "models" / c.name, step=c.steps,
               extra={"stage": "qa", "init": init, "doc_encoder_id": system.meta.get("doc_encoder_id", ""),
                      "retrieval": c.retrieval, "retrieval_mode": cfg.retrieval.mode, "early_k": c.early_k})
    metrics.close()
    return {"steps": c.steps, "seconds": time.time() - t0, "skipped_no_answer": skipped}
