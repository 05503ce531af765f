"""An Open-QA model with its fixed index: what answers a question (evaluate, query, the benchmarks).

p(y|x) = Σ_{z ∈ top-k} p(z|x) Σ_{s ∈ z, text(s) = y} p(s|z,x); the doc encoder and the index
stay fixed (ORQA/REALM fine-tuning), so relevance uses the index's own embeddings and only the
query side gets gradients.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from core.errors import InputError
from indexer.embed import pad_batch
from indexer.shards import ShardedIndex
from trainer.checkpoint import load_model
from trainer.config import TrainConfig
from trainer.index_client import CandidateSource, index_for_model, index_spec
from trainer.model import (
    REALM,
    OpenQAModel,
    answer_log_probs,
    marginal_log_likelihood,
    retrieval_posterior,
    span_log_joint,
)
from trainer.qa import QAExample, answer_in_text, exact_match
from trainer.qa_batch import answer_mask, make_qa_batch
from trainer.run import Run, check_k, resolve_model_dir

NO_ANSWER = {"prediction": "", "block_id": -1, "z": -1, "char_span": [0, 0], "answer_ids": [], "score": float("-inf")}


class QASystem:
    """A model, its fixed index and the doc embeddings behind it: everything a question needs."""

    def __init__(self, run: Run, model: OpenQAModel | REALM, meta: dict, retrieval: str = "index",
                 index: ShardedIndex | None = None):
        """`index`: the corpus embedded by this model's doc encoder (default: the run's, built if missing)."""
        self.run, self.meta, self.retrieval = run, meta, retrieval
        if isinstance(model, REALM):  # fine-tuning starts here: the span reader reads with the KAE's BERT
            model = OpenQAModel(model.retriever, model.reader.bert)
        self.model = model.to(run.device)
        self.index = index if index is not None else index_for_model(run, model, meta, index_spec(run.cfg))
        self.source = CandidateSource.for_run(run, self.index)  # retrieval.mode: dense | bm25 | hybrid
        self.doc_emb = torch.as_tensor(np.array(self.index.embeddings))
        self.rng = np.random.default_rng(0)

    def encode_questions(self, questions: list[str]) -> list[np.ndarray]:
        v, n = self.run.vocab, self.run.cfg.model.query_max_len - 2
        return [np.array([v.cls] + self.run.tok.encode(q, add_special_tokens=False).ids[:n] + [v.sep], np.int64)
                for q in questions]

    def embed_questions(self, questions: list[str]) -> tuple[list[np.ndarray], torch.Tensor]:
        """The questions' wordpiece ids and their query-tower embeddings [B, dim] (with grad)."""
        q = self.encode_questions(questions)
        q_ids, q_mask = pad_batch(q, self.run.vocab.pad)
        return q, self.model.retriever.embed_queries(q_ids.to(self.run.device), q_mask.to(self.run.device))

    def relevance(self, q_ids: torch.Tensor, q_mask: torch.Tensor, k: int, candidates: np.ndarray | None = None,
                  questions: list[str] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """`score` for padded query ids [B, Lq] and their mask."""
        q = self.model.retriever.embed_queries(q_ids.to(self.run.device), q_mask.to(self.run.device))
        return self.score(q, k, candidates, questions)

    def score(self, q: torch.Tensor, k: int, candidates: np.ndarray | None = None,
              questions: list[str] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Scores [B, k] of query embeddings `q` [B, dim] against the fixed doc embeddings (grad to the query
        tower) and ids [B, k], the candidates retrieval.mode picks (`questions`, the same queries as text, for bm25
        and hybrid); `candidates` [B, k'] (-1 = none) scores those blocks instead of searching."""
        if candidates is not None:
            ids = np.asarray(candidates, np.int64)
        elif self.retrieval == "random":
            live = getattr(self.index, "live", None)
            pool = len(self.doc_emb) if live is None else live  # never a dead block
            ids = np.stack([self.rng.choice(pool, size=k, replace=False) for _ in range(len(q))])
        else:
            if self.source.mode != "dense" and questions is None:
                raise ValueError(f"retrieval.mode={self.source.mode} needs the questions' text")
            ids = self.source.search(q.detach().float().cpu().numpy(), questions, k)
        d = self.doc_emb[torch.from_numpy(np.maximum(ids, 0))].to(q.device)
        scores = torch.einsum("bd,bkd->bk", q.float(), d)
        return scores.masked_fill(torch.from_numpy(ids < 0).to(q.device), float("-inf")), ids

    def answer_ids(self, answers: list[str]) -> list[list[int]]:
        return [self.run.tok.encode(a, add_special_tokens=False).ids for a in answers]

    def early_update_loss(self, q: torch.Tensor, questions: list[str], answers: list[list[str]],
                          is_regex: list[bool], k: int) -> tuple[torch.Tensor | None, float]:
        """ORQA's early update (Lee et al. 2019, §5): -log Σ p(z|x) over the blocks of the top k whose text holds
        an answer string, p(z|x) a softmax over those k; the mean over the questions that have one (None if none
        does), and their share. It trains the query tower alone, over a wider top-k than the reader reads, with
        the answer string as a distant label: the reader's marginal only ranks the few blocks it reads. `q`: the
        questions' embeddings from `embed_questions` (shared with `forward`, so the query tower runs once)."""
        scores, ids = self.score(q, k, None, questions)
        correct = torch.tensor([[b >= 0 and answer_in_text(self.run.store.text(int(b)), ans, rx) for b in row]
                                for row, ans, rx in zip(ids, answers, is_regex)], device=scores.device)
        has = correct.any(-1)
        if not has.any():
            return None, 0.0
        log_p = scores.log_softmax(-1).masked_fill(~correct, float("-inf"))
        return -torch.logsumexp(log_p[has], -1).mean(), float(has.float().mean())

    def forward(self, questions: list[str], answers: list[list[str]] | None, k: int, max_answer_len: int,
                candidates: np.ndarray | None = None, embedded: tuple[list[np.ndarray], torch.Tensor] | None = None):
        """Retrieval scores [B, K], candidate ids [B, K], span scores [B, K, L, A] and the QABatch; `candidates`
        [B, K] reads those blocks instead of the top-k (explain's leave-one-out check); `embedded`: the
        questions' `embed_questions`, when the caller has them already."""
        q, q_emb = embedded if embedded is not None else self.embed_questions(questions)
        scores, cand = self.score(q_emb, k, candidates, questions)
        ans = [self.answer_ids(a) for a in answers] if answers else [[] for _ in questions]
        batch = make_qa_batch(self.run.store, self.run.vocab, q, cand, ans, self.run.cfg.model.reader_max_len,
                              max_answer_len)
        B, K, L = batch.reader_ids.shape
        dev = self.run.device
        span = self.model.span_scores(batch.reader_ids.view(B * K, L).to(dev), batch.reader_mask.view(B * K, L).to(dev),
                                      batch.reader_types.view(B * K, L).to(dev),
                                      batch.span_mask.view(B * K, L, -1).to(dev)).view(B, K, L, -1)
        return scores, cand, span, batch

    def decode(self, scores: torch.Tensor, cand: np.ndarray, span: torch.Tensor, batch) -> list[dict | None]:
        """The best span of each question across its candidates (log p(z|x) + log p(s|z,x)): its text, block,
        candidate column `z`, char span and wordpiece ids; None for a question whose every score is -inf
        (no candidate left). A column of -inf in `scores` leaves that block out, p(z|x) renormalized."""
        total = span_log_joint(scores, span).flatten(1)
        L, A = span.shape[2], span.shape[-1]
        out = []
        for b in range(len(cand)):
            if not torch.isfinite(scores[b]).any():
                out.append(None)
                continue
            best = int(total[b].argmax())
            z, rest = divmod(best, L * A)
            i, a = divmod(rest, A)
            block = int(cand[b, z])
            text, char_span = self.span_text(block, i - int(batch.text_start[b, z]), a + 1)
            out.append({"prediction": text, "block_id": block, "z": z, "char_span": list(char_span),
                        "answer_ids": batch.reader_ids[b, z, i:i + a + 1].tolist(), "score": float(total[b, best])})
        return out

    def answer_log_probs(self, cand: np.ndarray, span: torch.Tensor, batch, answers: list[list[int]]) -> torch.Tensor:
        """log p(y|z,x) [B, K] of each question's answer y (wordpiece ids), summed over the spans of z that
        match it as in fine-tuning (about -1e30 where none does)."""
        mask = answer_mask(batch.reader_ids, batch.text_start, batch.text_end, cand, [[a] for a in answers],
                           span.shape[-1])
        return answer_log_probs(span, mask.to(span.device))

    def answer(self, scores: torch.Tensor, cand: np.ndarray, span: torch.Tensor, batch) -> list[dict]:
        """`decode`'s best span with its p(y|x) (`probability`) and, for each candidate, p(z|x) (`p_z`),
        p(y|z,x) (`p_y_given_z`) and its share of p(y|x), p(z|x) p(y|z,x) / p(y|x) (`shares`)."""
        best = [p or NO_ANSWER for p in self.decode(scores, cand, span, batch)]
        log_p_y_z = self.answer_log_probs(cand, span, batch, [p["answer_ids"] for p in best])
        shares = retrieval_posterior(scores, log_p_y_z)
        log_p_y = marginal_log_likelihood(scores, log_p_y_z)
        p_z = scores.float().softmax(-1)
        return [{**pred, "probability": float(log_p_y[b].exp()), "p_z": p_z[b].tolist(),
                 "p_y_given_z": log_p_y_z[b].exp().tolist(), "shares": shares[b].tolist()}
                for b, pred in enumerate(best)]

    def predict(self, questions: list[str], k: int, max_answer_len: int, candidates: np.ndarray | None = None
                ) -> list[dict]:
        """`answer` for each question, with its top-k ids and scores, `top_share`: the largest share of p(y|x)
        that one block holds (low: no single block carries the answer, so it rests on weak or split evidence),
        and `top_share_block`, the block that holds it."""
        with torch.no_grad():
            scores, cand, span, batch = self.forward(questions, None, k, max_answer_len, candidates)
            answers = self.answer(scores, cand, span, batch)
        out = []
        for b, pred in enumerate(answers):
            top = max(range(len(pred["shares"])), key=pred["shares"].__getitem__)
            out.append({**pred, "top_k": [int(c) for c in cand[b]],
                        "scores": [float(s) for s in scores[b].float().cpu()],
                        "top_share": pred["shares"][top], "top_share_block": int(cand[b, top])})
        return out

    def span_text(self, block: int, first: int, length: int) -> tuple[str, tuple[int, int]]:
        return block_span_text(self.run, block, first, length)


def block_span_text(run: Run, block: int, first: int, length: int) -> tuple[str, tuple[int, int]]:
    """Text of `length` wordpieces from the `first` text token of a block, via char offsets."""
    if block < 0:
        return "", (0, 0)
    text = run.store.text(block)
    offsets = run.tok.encode(text, add_special_tokens=False).offsets
    if not offsets:
        return "", (0, 0)
    first = min(max(first, 0), len(offsets) - 1)
    last = min(first + length - 1, len(offsets) - 1)
    return text[offsets[first][0]:offsets[last][1]], (offsets[first][0], offsets[last][1])


def snippet(text: str, char_span: tuple[int, int] | list[int] | None) -> str:
    """The text around an answer, marked [[ ]]; without one, the block's beginning."""
    if char_span is None:
        return text[:200]
    cs, ce = char_span
    return text[max(0, cs - 80):cs] + "[[" + text[cs:ce] + "]]" + text[ce:ce + 80]


def resolve_qa_model_dir(run_dir: Path, spec: str) -> Path:
    return resolve_model_dir(run_dir, spec, auto=("qa", "realm", "ict"))


def load_qa_system(cfg: TrainConfig, spec: str) -> QASystem:
    run = Run.open(cfg)
    check_k(cfg.finetune.k, run.store, "finetune.k")
    model, meta = load_model(resolve_qa_model_dir(run.dir, spec))
    return QASystem(run, model, meta, cfg.finetune.retrieval)


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
                            "top_k": pred["top_k"], "scores": pred["scores"], "top_share": pred["top_share"],
                            "top_share_block": pred["top_share_block"],
                            "top_share_doc": system.run.store.doc_id(pred["top_share_block"])
                            if pred["top_share_block"] >= 0 else None, "gold_id": ex.gold_id})
    return records


def query(cfg: TrainConfig) -> dict:
    """`launch.py query`: the answer to `cfg.question`, its top-k blocks (the answer marked [[ ]] in its
    block), and the seconds spent loading and answering."""
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
        blocks.append({"block_id": b, "title": system.run.store.title(b), "score": s,
                       "snippet": snippet(text, pred["char_span"] if b == pred["block_id"] else None)})
    return {"question": cfg.question, "answer": pred["prediction"], "blocks": blocks,
            "load_seconds": round(t1 - t0, 3), "query_seconds": round(t2 - t1, 3)}
