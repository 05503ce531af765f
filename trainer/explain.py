"""`launch.py explain`: which blocks an answer rests on, and what the model says without each of them.

question="..." (a QA model): the answer `QASystem.predict` gives, and for each top-k block p(z|x), p(y|z,x)
of that answer, the block's share of p(y|x), p(z|x) p(y|z,x) / p(y|x), and the answer (with its p(y|x))
when the block is left out of the candidates. text="..." answer="..." (a pre-trained model): the `answer`
substring of `text` is masked as in the pre-training data; the prediction is the marginal's most likely
word at each masked position (what `evaluate` scores), and the rows are the top-k blocks and the null
document, with the same numbers from `REALM.forward`.

Every number comes from the code that trains and evaluates, recomputed with the current encoders. A left-out
block is a candidate whose score is -inf, so p(z|x) renormalizes over the others; since each candidate is
read on its own, that equals a fresh pass over the shorter candidate list (tests/test_explain.py checks it),
without reading the k blocks k more times.
"""
from __future__ import annotations

import numpy as np
import torch

from core.errors import InputError
from indexer.shards import ShardedIndex
from trainer import data as D
from trainer.checkpoint import load_model
from trainer.config import TrainConfig
from trainer.index_client import CandidateSource, index_for_model, index_spec, retrieve
from trainer.model import (
    REALM,
    candidate_span_log_probs,
    marginal_log_likelihood,
    marginal_token_log_probs,
    retrieval_posterior,
    spans_correct,
)
from trainer.qa_batch import answer_mask, find_tokens
from trainer.qa_system import QASystem, block_span_text, load_qa_system, resolve_qa_model_dir, snippet
from trainer.run import Run, check_k, resolve_model_dir

USAGE = ("explain needs question=\"...\" (a QA model) or text=\"...\" answer=\"...\" (a pre-trained model; "
         "answer is the substring of text to mask)")


def explain(cfg: TrainConfig) -> dict:
    question, text, answer = cfg.question.strip(), cfg.text, cfg.answer
    if question and (text or answer):
        raise InputError("config key 'question': question=... asks the QA model, text=... answer=... the "
                         "pre-trained one: give one of them, not both")
    if question:
        system = load_qa_system(cfg, cfg.eval.model)
        return {**explain_question(system, question, cfg.finetune.k, cfg.finetune.max_answer_len),
                "model": str(resolve_qa_model_dir(system.run.dir, cfg.eval.model))}
    if not text.strip():
        raise InputError(f"config key 'question': {USAGE}")
    if not answer:
        raise InputError(f"config key 'answer': give the substring of text to mask; {USAGE}")
    D.answer_span(text, answer, "config key 'answer'")  # bad input fails before a model is loaded
    run = Run.open(cfg)
    check_k(cfg.eval.k, run.store, "eval.k")
    model_dir = resolve_model_dir(run.dir, cfg.eval.model)
    model, meta = load_model(model_dir)
    if not isinstance(model, REALM):
        raise InputError(f"config key 'eval.model': {model_dir} is a QA model; text=... needs a pre-trained one "
                         f"(realm or ict), question=... asks the QA model")
    model.to(run.device)
    return {**explain_text(model, index_for_model(run, model, meta, index_spec(cfg)), run, text, answer, cfg.eval.k),
            "model": str(model_dir)}


def left_out(scores: torch.Tensor, z: int) -> torch.Tensor:
    """The retrieval scores with candidate column `z` removed (its p(z|x) goes to the others)."""
    out = scores.clone()
    out[:, z] = float("-inf")
    return out


def _without(answer: dict | None) -> dict:
    if answer is None:
        return {"prediction": None, "probability": None}  # no candidate left to answer from
    return {"prediction": answer["prediction"], "probability": answer["probability"]}


def _row(run: Run, block: int | None, answer: dict, z: int, char_span, without: dict | None) -> dict:
    null = block is None
    return {"block_id": block, "doc_id": None if null else run.store.doc_id(block),
            "title": "(null document: x alone)" if null else run.store.title(block),
            "evidence": "" if null else snippet(run.store.text(block), char_span),
            "p_z": answer["p_z"][z], "p_y_given_z": answer["p_y_given_z"][z], "share": answer["shares"][z],
            "without": _without(without)}


def explain_question(system: QASystem, question: str, k: int, max_answer_len: int,
                     candidates: np.ndarray | None = None) -> dict:
    """The QA model's answer and its top-k blocks (or `candidates` [1, K], read instead of searching)."""
    system.model.eval()
    with torch.no_grad():
        scores, cand, span, batch = system.forward([question], None, k, max_answer_len, candidates)
        pred = system.answer(scores, cand, span, batch)[0]
        matches = answer_mask(batch.reader_ids, batch.text_start, batch.text_end, cand, [[pred["answer_ids"]]],
                              span.shape[-1])[0]
        rows = []
        for z, block in enumerate(int(c) for c in cand[0]):
            if block < 0:
                continue
            without = system.answer(left_out(scores, z), cand, span, batch)[0]
            rows.append(_row(system.run, block, pred, z, _qa_evidence(system.run, span[0, z], matches[z], block,
                                                                        int(batch.text_start[0, z])),
                             without if without["block_id"] >= 0 else None))
    return {"question": question, "prediction": pred["prediction"], "probability": pred["probability"],
            "block_id": pred["block_id"], "blocks": rows}


def _qa_evidence(run: Run, span: torch.Tensor, matches: torch.Tensor, block: int, text_start: int):
    """Char span of the answer's likeliest occurrence in the block (span [L, A], matches [L, A] bool), or None."""
    if not matches.any():
        return None
    i, a = divmod(int(span.float().masked_fill(~matches.to(span.device), float("-inf")).argmax()), span.shape[-1])
    return block_span_text(run, block, i - text_start, a + 1)[1]


def masked_query(run: Run, text: str, answer: str) -> D.MaskedQuery:
    """x with `answer` masked, as `prepare` masks a pre-training line's given answer."""
    ex = D.Example(text=text, spans=[D.answer_span(text, answer, "config key 'answer'")], fixed_span=True)
    # a given answer is always the masked span, whatever masking.mode says (the data contract)
    query = D.mask_example(ex, run.tok, run.vocab, run.cfg.model.query_max_len, np.random.default_rng(0), "salient")
    if query is None:
        raise InputError(f"config key 'answer': {answer!r} cannot be masked: it has no wordpieces or more than "
                         f"{D.MAX_MASKED_TOKENS}")
    return query


def _mlm_answer(run: Run, scores: torch.Tensor, token_lp: torch.Tensor, target_mask: torch.Tensor) -> dict | None:
    """The marginal's most likely word at each masked position and, as `QASystem.answer` gives them, its
    p(y|x) and each candidate's p(z|x), p(y|z,x) and share; None when no candidate is left."""
    if not torch.isfinite(scores).any():
        return None
    ids = marginal_token_log_probs(scores, token_lp).argmax(-1)            # [1, M]
    span_lp = candidate_span_log_probs(token_lp, ids, target_mask)          # [1, Z]
    kept = ids[0][target_mask[0].bool()].tolist()
    return {"prediction": run.tok.decode(kept), "answer_ids": kept,
            "probability": float(marginal_log_likelihood(scores, span_lp)[0].exp()),
            "p_z": scores[0].float().softmax(-1).tolist(), "p_y_given_z": span_lp[0].exp().tolist(),
            "shares": retrieval_posterior(scores, span_lp)[0].tolist()}


def _text_evidence(run: Run, block: int, ids: list[int]):
    """Char span of the first occurrence of the predicted wordpieces in the block's text, or None."""
    tokens = np.asarray(run.store.tokens(block))
    lo = int(np.nonzero(tokens == run.vocab.sep)[0][0]) + 1  # [CLS] title [SEP] text [SEP]
    hits = find_tokens(tokens, ids, lo, len(tokens) - 1) if ids else []
    return block_span_text(run, block, hits[0] - lo, len(ids))[1] if hits else None


def explain_text(model: REALM, index: ShardedIndex, run: Run, text: str, answer: str, k: int,
                 candidates: np.ndarray | None = None) -> dict:
    """The pre-trained model's fill-in for `answer` masked in `text`, its top-k blocks (or `candidates`
    [1, K], read instead of searching) and the null document."""
    query = masked_query(run, text, answer)
    model.eval()
    with torch.no_grad():
        if candidates is None:
            candidates = retrieve(model, CandidateSource.for_run(run, index), run, [query], k)
        cand = np.asarray(candidates, np.int64)
        batch = D.collate_realm([query], cand, run.store, run.vocab, run.cfg.model.reader_max_len).to(run.device)
        out = model(batch)
        scores, token_lp = out["scores"], out["token_log_probs"]           # column 0: the null document
        pred = _mlm_answer(run, scores, token_lp, batch.target_mask)
        correct = bool(spans_correct(marginal_token_log_probs(scores, token_lp), batch.targets, batch.target_mask)[0])
        rows = []
        for z, block in [*((z + 1, int(c)) for z, c in enumerate(cand[0]) if c >= 0), (0, None)]:
            evidence = None if block is None else _text_evidence(run, block, pred["answer_ids"])
            rows.append(_row(run, block, pred, z, evidence,
                             _mlm_answer(run, left_out(scores, z), token_lp, batch.target_mask)))
    s, e = D.answer_span(text, answer, "config key 'answer'")
    return {"text": text, "masked_text": text[:s] + "[MASK]" + text[e:], "answer": answer,
            "prediction": pred["prediction"], "correct": correct, "probability": pred["probability"],
            "answer_probability": float(out["log_likelihood"][0].exp()), "blocks": rows}
