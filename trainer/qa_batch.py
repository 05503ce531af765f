"""Open-QA tensors: questions and their top-k blocks as reader inputs with the span masks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from indexer.blocks import BlockStore
from indexer.embed import pad_batch
from indexer.tokenizer import Vocab
from trainer.data import reader_input


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
    text_end: np.ndarray       # [B, K] reader position of the [SEP] after the block's (kept) text


def find_tokens(seq: np.ndarray, pattern: list[int], lo: int, hi: int) -> list[int]:
    """Start positions in lo..hi of `pattern` lying wholly inside seq[lo:hi]."""
    n = len(pattern)
    return [i for i in range(lo, hi - n + 1) if seq[i] == pattern[0] and list(seq[i:i + n]) == pattern]


def answer_mask(reader_ids: torch.Tensor, text_start: np.ndarray, text_end: np.ndarray, candidates: np.ndarray,
                answers: list[list[list[int]]], max_answer_len: int) -> torch.Tensor:
    """[B, K, L, A] bool: the spans of each block's text whose wordpieces equal one of its question's answers
    (reader_ids [B, K, L]; answers as wordpiece ids; an answer longer than A matches nowhere)."""
    B, K, L = reader_ids.shape
    ids = reader_ids.numpy()
    mask = np.zeros((B, K, L, max_answer_len), bool)
    for b in range(B):
        for k in range(K):
            if candidates[b, k] < 0:
                continue
            for ans in answers[b]:
                if 0 < len(ans) <= max_answer_len:
                    for i in find_tokens(ids[b, k], list(ans), text_start[b, k], text_end[b, k]):
                        mask[b, k, i, len(ans) - 1] = True
    return torch.from_numpy(mask)


def make_qa_batch(store: BlockStore, vocab: Vocab, questions: list[np.ndarray], candidates: np.ndarray,
                  answers: list[list[list[int]]], max_len: int, max_answer_len: int) -> QABatch:
    """questions: [CLS] q [SEP] ids; candidates [B, K] block ids (-1 = none: an empty block); answers:
    each question's answers as wordpiece ids (empty when unknown, as at inference)."""
    B, K = candidates.shape
    seqs, types, starts, ends = [], [], np.zeros((B, K), np.int64), np.zeros((B, K), np.int64)
    for b, (q, row) in enumerate(zip(questions, candidates)):
        for k, c in enumerate(row):
            block = store.tokens(int(c)) if c >= 0 else np.array([vocab.cls, vocab.sep, vocab.sep], np.int32)
            seq, seq_types = reader_input(q, block, max_len, vocab.sep)
            title_end = int(np.nonzero(block == vocab.sep)[0][0])
            starts[b, k], ends[b, k] = min(len(q) + title_end, len(seq) - 1), len(seq) - 1
            seqs.append(seq)
            types.append(seq_types)
    ids, mask = pad_batch(seqs, vocab.pad)
    tt, _ = pad_batch(types, 0)
    L, A = ids.shape[1], max_answer_len
    span_mask = np.zeros((B, K, L, A), bool)
    for b in range(B):
        for k in range(K):
            lo, hi = starts[b, k], ends[b, k]
            for a in range(A):
                span_mask[b, k, lo:max(lo, hi - a), a] = True
    q_ids, q_mask = pad_batch(questions, vocab.pad)
    reader_ids = ids.view(B, K, L)
    return QABatch(q_ids, q_mask, reader_ids, mask.view(B, K, L), tt.view(B, K, L), torch.from_numpy(span_mask),
                   answer_mask(reader_ids, starts, ends, candidates, answers, A), starts, ends)
