"""`launch.py evaluate`: masked-span accuracy on held-out statements (task=mlm), or Open-QA exact
match (task=openqa). Each writes run_dir/metrics.json and returns the metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core.errors import InputError
from core.files import atomic_write_bytes, atomic_write_json
from trainer import data as D
from trainer.checkpoint import load_model
from trainer.config import TrainConfig
from trainer.index_client import CandidateSource, index_for_model, index_spec, retrieve
from trainer.model import marginal_token_log_probs, spans_correct
from trainer.qa import QAExample, qa_file, read_qa
from trainer.qa_system import answer_questions, load_qa_system, resolve_qa_model_dir
from trainer.run import Run, check_k, resolve_model_dir


def evaluate(cfg: TrainConfig) -> dict:
    return evaluate_openqa(cfg) if cfg.task == "openqa" else evaluate_masked_spans(cfg)


def eval_examples(cfg: TrainConfig, run: Run) -> tuple[list[D.Example], str]:
    """`data.eval` when given (text JSONL, the pre-training data contract), else prepare's held-out
    examples/eval.parquet; with the file scored."""
    if cfg.data.eval:
        examples = D.read_text_examples(cfg.data.eval, run.store)
        if cfg.masking.mode in ("salient", "uniform"):
            examples = D.attach_salient_spans(examples, cfg.masking.ner)
        return examples, cfg.data.eval
    path = run.dir / "examples" / "eval.parquet"
    return D.read_examples(path), str(path)


@torch.no_grad()
def evaluate_masked_spans(cfg: TrainConfig) -> dict:
    """Masked-span accuracy with and without retrieval, and retrieval recall@k, on held-out examples."""
    run = Run.open(cfg)
    k = cfg.eval.k
    check_k(k, run.store, "eval.k")
    model_dir = resolve_model_dir(run.dir, cfg.eval.model)
    model, meta = load_model(model_dir)
    retriever_dir, retriever_meta = swap_retriever(cfg, run, model, meta, model_dir)
    model.to(run.device).eval()
    index = index_for_model(run, model, retriever_meta, index_spec(cfg))
    source = CandidateSource.for_run(run, index)
    examples, eval_file = eval_examples(cfg, run)
    examples = examples[:cfg.data.max_eval_examples]
    rng = np.random.default_rng(12345)  # the same masked span every evaluation
    queries = [q for ex in examples if (q := D.mask_example(ex, run.tok, run.vocab, cfg.model.query_max_len, rng,
                                                              cfg.masking.mode, cfg.masking.random_span_max))]
    if not queries:
        raise InputError(f"{eval_file}: no evaluable examples")
    correct = correct_null = recall_hits = recall_n = span_hits = correct_with_span = 0
    for i in range(0, len(queries), cfg.eval.batch_size):
        qs = queries[i:i + cfg.eval.batch_size]
        cand = retrieve(model, source, run, qs, k)
        batch = D.collate_realm(qs, cand, run.store, run.vocab, cfg.model.reader_max_len).to(run.device)
        token_lp = model.token_log_probs(batch)                              # [B, Z, M, V]
        marginal = marginal_token_log_probs(model.relevance(batch), token_lp)
        right = spans_correct(marginal, batch.targets, batch.target_mask).cpu().numpy().astype(bool)
        has_span = np.asarray(D.span_hits(qs, cand, run.store), dtype=bool)
        correct, span_hits = correct + int(right.sum()), span_hits + int(has_span.sum())
        correct_with_span += int((right & has_span).sum())
        correct_null += int(spans_correct(token_lp[:, 0], batch.targets, batch.target_mask).sum())
        hits = D.gold_hits(qs, cand)
        recall_n, recall_hits = recall_n + len(hits), recall_hits + sum(hits)
    n = len(queries)
    metrics = {"mlm_accuracy": correct / n, "mlm_accuracy_no_retrieval": correct_null / n,
               "retrieval_recall_at_k": recall_hits / recall_n if recall_n else None, "span_in_top_k": span_hits / n,
               # the reader's part, apart from the retriever's: accuracy where a copy was possible, and elsewhere
               "mlm_accuracy_span_in_top_k": correct_with_span / span_hits if span_hits else None,
               "mlm_accuracy_span_not_in_top_k": (correct - correct_with_span) / (n - span_hits)
               if n > span_hits else None,
               "k": k, "n": n, "n_with_gold": recall_n, "model": str(model_dir), "model_step": meta.get("step"),
               "retriever": str(retriever_dir),
               "index_version": index.version, "index_kind": cfg.index.kind, "retrieval_mode": cfg.retrieval.mode,
               "eval_file": eval_file}
    atomic_write_json(run.dir / "metrics.json", metrics)
    return metrics


def swap_retriever(cfg: TrainConfig, run: Run, model, meta: dict, model_dir: Path) -> tuple[Path, dict]:
    """`eval.retriever` (a model name or directory): its towers replace the model's, so the same reader reads
    what another retriever finds (the REALM reader with ICT's retriever); returns the retriever's directory
    and the meta its index is found by. Empty: the model's own (`model_dir`)."""
    if not cfg.eval.retriever:
        return model_dir, meta
    retriever_dir = resolve_model_dir(run.dir, cfg.eval.retriever)
    other, other_meta = load_model(retriever_dir)
    if other_meta["retrieval_dim"] != meta["retrieval_dim"]:
        raise InputError(f"config key 'eval.retriever': {retriever_dir} embeds in {other_meta['retrieval_dim']} "
                         f"dimensions, the model in {meta['retrieval_dim']}")
    model.retriever = other.retriever
    return retriever_dir, other_meta


def evaluate_openqa(cfg: TrainConfig) -> dict:
    """Exact match and answer-in-top-k on data.qa_eval; also writes run_dir/predictions.jsonl."""
    if cfg.eval.retriever:
        raise InputError("config key 'eval.retriever': read by task=mlm only (a QA model answers with its own "
                         "query tower over the index of its doc encoder)")
    examples: list[QAExample] = read_qa(qa_file(cfg, "qa_eval"))[:cfg.data.max_eval_examples]
    system = load_qa_system(cfg, cfg.eval.model)
    k = cfg.finetune.k
    records = answer_questions(system, examples, k, cfg.finetune.max_answer_len, cfg.eval.batch_size)
    n = len(examples)
    # where the questions name their gold document: how often a correct answer rests mostly on it
    grounded = [r for r in records if r["exact_match"] and r["gold_id"] is not None]
    metrics = {"exact_match": sum(r["exact_match"] for r in records) / n,
               "top_share_is_gold": sum(r["top_share_doc"] == r["gold_id"] for r in grounded) / len(grounded)
               if grounded else None, "n_top_share_checked": len(grounded),
               "retrieval_recall_at_k": sum(r["answer_in_top_k"] for r in records) / n, "k": k, "n": n,
               "index_version": system.index.version,
               "model": str(resolve_qa_model_dir(system.run.dir, cfg.eval.model)), "retrieval": cfg.finetune.retrieval,
               "retrieval_mode": cfg.retrieval.mode, "index_kind": cfg.index.kind}
    atomic_write_bytes(system.run.dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    atomic_write_json(system.run.dir / "metrics.json", metrics)
    return metrics
