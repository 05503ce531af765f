"""Open-QA: fine-tune the query tower and a span reader over a fixed index; evaluate; query.

p(y|x) = Σ_{z ∈ top-k} p(z|x) Σ_{s ∈ z, text(s) = y} p(s|z,x); the doc encoder and the index
stay fixed (ORQA/REALM fine-tuning), so relevance uses the index's own embeddings and only the
query side gets gradients.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from indexer.embed import pad_batch
from indexer.io import InputError, atomic_write_bytes, atomic_write_json
from indexer.shards import ShardedIndex
from trainer.checkpoint import load_model, save_model
from trainer.config import Config
from trainer.engine import TorchEngine, param_groups
from trainer.loop import Run, check_k, index_for_model, resolve_model_dir
from trainer.metrics import MetricsLogger
from trainer.model import REALM, OpenQAModel, span_marginal_log_likelihood
from trainer.qa import QAExample, answer_in_text, exact_match, read_qa


@dataclass
class QABatch:
    q_ids: torch.Tensor        # [B, Lq]
    q_mask: torch.Tensor
    reader_ids: torch.Tensor   # [B, K, L]  [CLS] question [SEP] title [SEP] text [SEP]
    reader_mask: torch.Tensor
    reader_types: torch.Tensor
    span_mask: torch.Tensor    # [B, K, L, A] bool: span (i, length a+1) lies inside the block's text
    answer_mask: torch.Tensor  # [B, K, L, A] bool: ... and its wordpieces equal an answer's
    text_start: np.ndarray     # [B, K] reader position of the block's first text token


def _find(seq: np.ndarray, pattern: list[int], lo: int, hi: int) -> list[int]:
    n = len(pattern)
    return [i for i in range(lo, hi - n + 1) if seq[i] == pattern[0] and list(seq[i:i + n]) == pattern]


def make_qa_batch(run: Run, questions: list[np.ndarray], candidates: np.ndarray, answers: list[list[list[int]]],
                  max_len: int, max_answer_len: int) -> QABatch:
    B, K = candidates.shape
    vocab = run.vocab
    seqs, types, starts, ends = [], [], np.zeros((B, K), np.int64), np.zeros((B, K), np.int64)
    for b, (q, row) in enumerate(zip(questions, candidates)):
        for k, c in enumerate(row):
            block = run.store.tokens(int(c)) if c >= 0 else np.array([vocab.cls, vocab.sep, vocab.sep], np.int32)
            seq = np.concatenate([q, block[1:]]).astype(np.int64)[:max_len]
            seq[-1] = vocab.sep
            title_end = int(np.nonzero(block == vocab.sep)[0][0])
            starts[b, k], ends[b, k] = min(len(q) + title_end, len(seq) - 1), len(seq) - 1
            seqs.append(seq)
            types.append(np.r_[np.zeros(len(q), np.int64), np.ones(len(seq) - len(q), np.int64)])
    ids, mask = pad_batch(seqs, vocab.pad)
    tt, _ = pad_batch(types, 0)
    L, A = ids.shape[1], max_answer_len
    span_mask = np.zeros((B, K, L, A), bool)
    answer_mask = np.zeros((B, K, L, A), bool)
    for b in range(B):
        for k in range(K):
            lo, hi = starts[b, k], ends[b, k]
            for a in range(A):
                span_mask[b, k, lo:max(lo, hi - a), a] = True
            if candidates[b, k] < 0:
                continue
            seq = seqs[b * K + k]
            for ans in answers[b]:
                if 0 < len(ans) <= A:
                    for i in _find(seq, ans, lo, hi):
                        answer_mask[b, k, i, len(ans) - 1] = True
    q_ids, q_mask = pad_batch(questions, vocab.pad)
    return QABatch(q_ids, q_mask, ids.view(B, K, L), mask.view(B, K, L), tt.view(B, K, L),
                   torch.from_numpy(span_mask), torch.from_numpy(answer_mask), starts)


class QASystem:
    """A model, its fixed index and the doc embeddings behind it: everything a question needs."""

    def __init__(self, run: Run, model: OpenQAModel | REALM, meta: dict, retrieval: str = "index",
                 index: ShardedIndex | None = None):
        """`index`: the corpus embedded by this model's doc encoder (default: the run's, built if missing)."""
        self.run, self.meta, self.retrieval = run, meta, retrieval
        if isinstance(model, REALM):  # fine-tuning starts here: the span reader reads with the KAE's BERT
            model = OpenQAModel(model.retriever, model.reader.bert)
        self.model = model.to(run.device)
        self.index = index if index is not None else index_for_model(run, model, meta)
        self.doc_emb = torch.as_tensor(np.array(self.index.embeddings))
        self.rng = np.random.default_rng(0)

    def encode_questions(self, questions: list[str]) -> list[np.ndarray]:
        v, n = self.run.vocab, self.run.cfg.model.query_max_len - 2
        return [np.array([v.cls] + self.run.tok.encode(q, add_special_tokens=False).ids[:n] + [v.sep], np.int64)
                for q in questions]

    def relevance(self, q_ids: torch.Tensor, q_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, np.ndarray]:
        """Scores [B, k] against the fixed doc embeddings (grad to the query tower) and ids [B, k]."""
        q = self.model.retriever.embed_queries(q_ids.to(self.run.device), q_mask.to(self.run.device))
        if self.retrieval == "random":
            ids = np.stack([self.rng.choice(len(self.doc_emb), size=k, replace=False) for _ in range(len(q))])
        else:
            _, ids = self.index.search(q.detach().float().cpu().numpy(), k)
        d = self.doc_emb[torch.from_numpy(np.maximum(ids, 0))].to(q.device)
        scores = torch.einsum("bd,bkd->bk", q.float(), d)
        return scores.masked_fill(torch.from_numpy(ids < 0).to(q.device), float("-inf")), ids

    def answer_ids(self, answers: list[str]) -> list[list[int]]:
        return [self.run.tok.encode(a, add_special_tokens=False).ids for a in answers]

    def forward(self, questions: list[str], answers: list[list[str]] | None, k: int, max_answer_len: int):
        q = self.encode_questions(questions)
        q_ids, q_mask = pad_batch(q, self.run.vocab.pad)
        scores, cand = self.relevance(q_ids, q_mask, k)
        ans = [self.answer_ids(a) for a in answers] if answers else [[] for _ in questions]
        batch = make_qa_batch(self.run, q, cand, ans, self.run.cfg.model.reader_max_len, max_answer_len)
        B, K, L = batch.reader_ids.shape
        dev = self.run.device
        span = self.model.span_scores(batch.reader_ids.view(B * K, L).to(dev), batch.reader_mask.view(B * K, L).to(dev),
                                      batch.reader_types.view(B * K, L).to(dev),
                                      batch.span_mask.view(B * K, L, -1).to(dev)).view(B, K, L, -1)
        return scores, cand, span, batch

    def predict(self, questions: list[str], k: int, max_answer_len: int) -> list[dict]:
        """Best span across the top-k (log p(z|x) + log p(s|z,x)) and each question's top-k."""
        with torch.no_grad():
            scores, cand, span, batch = self.forward(questions, None, k, max_answer_len)
        log_p_z = scores.log_softmax(-1)
        flat = span.flatten(2)
        log_p_s = flat - torch.logsumexp(flat, -1, keepdim=True)
        total = (log_p_z[:, :, None] + log_p_s).flatten(1)
        out = []
        A = span.shape[-1]
        L = span.shape[2]
        for b in range(len(questions)):
            best = int(total[b].argmax())
            z, rest = divmod(best, L * A)
            i, a = divmod(rest, A)
            block = int(cand[b, z])
            text, (cs, ce) = self.span_text(block, i - int(batch.text_start[b, z]), a + 1)
            out.append({"prediction": text, "block_id": block, "char_span": [cs, ce],
                        "top_k": [int(c) for c in cand[b]], "scores": [float(s) for s in scores[b].float().cpu()],
                        "score": float(total[b, best])})
        return out

    def span_text(self, block: int, first: int, length: int) -> tuple[str, tuple[int, int]]:
        """Text of `length` wordpieces from the `first` text token of a block, via char offsets."""
        if block < 0:
            return "", (0, 0)
        text = self.run.store.text(block)
        offsets = self.run.tok.encode(text, add_special_tokens=False).offsets
        if not offsets:
            return "", (0, 0)
        first = min(max(first, 0), len(offsets) - 1)
        last = min(first + length - 1, len(offsets) - 1)
        return text[offsets[first][0]:offsets[last][1]], (offsets[first][0], offsets[last][1])


def load_qa_system(cfg: Config, spec: str) -> QASystem:
    run = Run.open(cfg)
    check_k(cfg.finetune.k, run.store, "finetune.k")
    model, meta = load_model(resolve_qa_model_dir(run.dir, spec))
    return QASystem(run, model, meta, cfg.finetune.retrieval)


def resolve_qa_model_dir(run_dir: Path, spec: str) -> Path:
    return resolve_model_dir(run_dir, spec, auto=("qa", "realm", "ict"))


def qa_file(cfg: Config, key: str) -> str:
    """data.qa_train / data.qa_eval, defaulting to the synthetic QA that `prepare` generated."""
    given = getattr(cfg.data, key)
    if given:
        return given
    generated = Path(cfg.run_dir) / "data" / f"{key}.jsonl"
    if not cfg.data.corpus and generated.is_file():
        return str(generated)
    raise InputError(f"config key 'data.{key}': a QA JSONL file (question, answers) is required")


def finetune(cfg: Config) -> dict:
    c = cfg.finetune
    train = read_qa(qa_file(cfg, "qa_train"))
    init = c.init if c.init != "auto" else ("realm" if (Path(cfg.run_dir) / "models" / "realm").is_dir() else "ict")
    torch.manual_seed(cfg.seed)
    system = load_qa_system(cfg, init)
    model = system.model.train()
    groups = param_groups(list(model.reader.named_parameters(prefix="reader")) +
                          list(model.span_head.named_parameters(prefix="span_head")), c.lr, c.head_lr, ("span_head",))
    groups.append({"params": list(model.retriever.query_tower.parameters()), "lr": c.retriever_lr})
    engine = TorchEngine(groups, c.steps, max(1, c.steps // 10), c.grad_clip)
    log = MetricsLogger(system.run.dir, "finetune", cfg)
    rng = np.random.default_rng(cfg.seed)
    t0, skipped = time.time(), 0
    for step in range(1, c.steps + 1):
        batch = [train[int(i)] for i in rng.integers(len(train), size=c.batch_size)]
        scores, cand, span, qb = system.forward([e.question for e in batch],
                                                [[] if e.is_regex else e.answers for e in batch], c.k, c.max_answer_len)
        answer_mask = qb.answer_mask.to(span.device)
        ll = span_marginal_log_likelihood(scores, span, answer_mask)
        found = answer_mask.flatten(1).any(-1)  # ORQA: skip questions with no answer in the top-k
        skipped += int((~found).sum())
        if found.any():
            engine.step(-ll[found].mean())
        if step % cfg.pretrain.log_every == 0 or step == c.steps:
            loss = -ll[found].mean().item() if found.any() else float("nan")
            found_share = float(found.float().mean())
            log.log(step, loss=loss, answer_found=found_share, elapsed=time.time() - t0)
            print(f"finetune step {step}/{c.steps} loss {loss:.3f} answer in top-{c.k} {found_share:.2f}", flush=True)
    save_model(model, system.run.dir / "models" / c.name, step=c.steps,
               extra={"stage": "qa", "init": init, "doc_encoder_id": system.meta.get("doc_encoder_id", ""),
                      "retrieval": c.retrieval})
    log.close()
    return {"steps": c.steps, "seconds": time.time() - t0, "skipped_no_answer": skipped}


def answer_questions(system: QASystem, examples: list[QAExample], k: int, max_answer_len: int, batch_size: int
                     ) -> list[dict]:
    """One record per question: prediction, exact match, answer string in the top-k blocks, top-k ids."""
    system.model.eval()
    records = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        for ex, pred in zip(chunk, system.predict([e.question for e in chunk], k, max_answer_len)):
            records.append({"question": ex.question, "prediction": pred["prediction"], "gold": ex.answers,
                            "exact_match": exact_match(pred["prediction"], ex.answers, ex.is_regex),
                            "answer_in_top_k": any(answer_in_text(system.run.store.text(b), ex.answers, ex.is_regex)
                                                   for b in pred["top_k"] if b >= 0),
                            "top_k": pred["top_k"], "scores": pred["scores"]})
    return records


def evaluate_openqa(cfg: Config) -> dict:
    examples: list[QAExample] = read_qa(qa_file(cfg, "qa_eval"))[:cfg.data.max_eval_examples]
    system = load_qa_system(cfg, cfg.eval.model)
    k = cfg.finetune.k
    records = answer_questions(system, examples, k, cfg.finetune.max_answer_len, cfg.eval.batch_size)
    n = len(examples)
    metrics = {"exact_match": sum(r["exact_match"] for r in records) / n,
               "retrieval_recall_at_k": sum(r["answer_in_top_k"] for r in records) / n, "k": k, "n": n,
               "index_version": system.index.version,
               "model": str(resolve_qa_model_dir(system.run.dir, cfg.eval.model)), "retrieval": cfg.finetune.retrieval}
    atomic_write_bytes(system.run.dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    atomic_write_json(system.run.dir / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


def query(cfg: Config, as_json: bool = False) -> dict:
    if not cfg.question.strip():
        raise InputError("config key 'question': give the question, e.g. question=\"who wrote Hamlet?\"")
    t0 = time.time()
    system = load_qa_system(cfg, cfg.eval.model)
    system.model.eval()
    t1 = time.time()
    pred = system.predict([cfg.question], cfg.finetune.k, cfg.finetune.max_answer_len)[0]
    t2 = time.time()
    blocks = []
    for b, s in zip(pred["top_k"], pred["scores"]):
        if b < 0:
            continue
        text = system.run.store.text(b)
        if b == pred["block_id"]:
            cs, ce = pred["char_span"]
            snippet = text[max(0, cs - 80):cs] + "[[" + text[cs:ce] + "]]" + text[ce:ce + 80]
        else:
            snippet = text[:200]
        blocks.append({"block_id": b, "title": system.run.store.title(b), "score": s, "snippet": snippet})
    result = {"question": cfg.question, "answer": pred["prediction"], "blocks": blocks,
              "load_seconds": round(t1 - t0, 3), "query_seconds": round(t2 - t1, 3)}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"Q: {cfg.question}\nA: {pred['prediction']}\n")
        for i, blk in enumerate(blocks, 1):
            print(f"{i}. [{blk['score']:.2f}] {blk['title']}\n   {blk['snippet']}")
        print(f"\n(load {result['load_seconds']} s, query {result['query_seconds']} s)", file=sys.stderr)
    return result
