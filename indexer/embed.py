"""Encode a range of blocks with a doc tower: [rows, dim] float32, in block-id order."""
from __future__ import annotations

import copy

import numpy as np
import torch
from tqdm import tqdm

from indexer.blocks import BlockStore


def pad_batch(seqs: list[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad int sequences: -> ids [N, L] int64, attention mask [N, L] int64."""
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        n = min(len(s), length)
        ids[i, :n] = s[:n]
        mask[i, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.inference_mode()
def encode_blocks(encode, store: BlockStore, ids: np.ndarray, batch_size: int = 64,
                  device: str | torch.device = "cpu", pad_id: int = 0, progress: bool = False) -> np.ndarray | None:
    """`encode(ids [N, L], mask [N, L]) -> [N, d]` over the blocks `ids` -> [len(ids), d] float32 in the
    order of `ids` (None when `ids` is empty). Blocks are batched by length (less padding)."""
    lengths = np.array([len(store.tokens(int(b))) for b in ids])
    order = np.argsort(-lengths, kind="stable")
    out = None
    bar = tqdm(total=len(ids), desc="embed", unit="block", disable=not progress, mininterval=2)
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        tok, mask = pad_batch([store.tokens(int(b)) for b in ids[rows]], pad_id)
        emb = encode(tok.to(device), mask.to(device)).float().cpu().numpy()
        if out is None:
            out = np.empty((len(ids), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
        bar.update(len(rows))
    bar.close()
    return out


def embed_blocks(doc_tower: torch.nn.Module, store: BlockStore, start: int = 0, end: int | None = None,
                 batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True,
                 pad_id: int = 0) -> np.ndarray:
    """Embeddings of blocks [start, end) -> [end - start, dim] float32, in block-id order.

    On CUDA a bf16 copy of the tower encodes (faster than bf16 autocast and than fp32:
    bench/embed_throughput.py); the output is float32 either way.
    """
    end = len(store) if end is None else end
    device = torch.device(device)
    was_training = doc_tower.training
    doc_tower.eval()
    tower = copy.deepcopy(doc_tower).to(torch.bfloat16) if device.type == "cuda" else doc_tower
    out = encode_blocks(tower, store, np.arange(start, end), batch_size, device, pad_id, progress)
    doc_tower.train(was_training)
    if out is None:
        out = np.empty((0, doc_tower.proj.out_features), dtype=np.float32)
    return out
