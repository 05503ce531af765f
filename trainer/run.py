"""What every command after `prepare` opens: the run directory, its block store, tokenizer and device.

A run directory (README, "Files in a run directory"):
    blocks/              block store (indexer.blocks)
    store/vNNNN, CORPUS  edited store versions and the pointer pairing one with its index (indexer.corpus_versions)
    examples/            train.parquet, eval.parquet (trainer.data)
    models/ict, models/realm, models/qa   model checkpoints (trainer.checkpoint)
    index/               index versions (indexer.versions)
    events.jsonl, metrics.json
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import InputError
from indexer.blocks import BlockStore
from indexer.corpus_versions import current_store_dir, read_pointer
from indexer.tokenizer import Vocab, load_tokenizer
from indexer.versions import IndexVersions
from trainer.config import TrainConfig


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Run:
    cfg: TrainConfig
    dir: Path
    store: BlockStore
    tok: object
    vocab: Vocab
    device: torch.device

    @classmethod
    def open(cls, cfg: TrainConfig) -> Run:
        run_dir = Path(cfg.run_dir)
        store = BlockStore(current_store_dir(run_dir))  # the committed pair's store (blocks/ if never edited)
        tok = load_tokenizer(store.vocab_file)
        return cls(cfg, run_dir, store, tok, Vocab(tok), pick_device(cfg))

    @property
    def versions(self) -> IndexVersions:
        return IndexVersions(self.dir / "index")

    def pinned_index_versions(self) -> tuple[int, ...]:
        """The index version the CORPUS pointer pairs with the store (none for an unedited run): gc keeps it."""
        pointer = read_pointer(self.dir)
        return (int(pointer["index_version"]),) if pointer else ()


def check_k(k: int, store: BlockStore, key: str) -> None:
    if k > store.num_live:  # an edited store's dead blocks are never candidates
        raise InputError(f"config key '{key}': k={k} is larger than the corpus ({store.num_live} blocks)")


def resolve_model_dir(run_dir: Path, spec: str, auto: tuple[str, ...] = ("realm", "ict")) -> Path:
    """`auto` = the first of `auto` under run_dir/models; a name there; else a directory path."""
    if spec == "auto":
        for name in auto:
            if (run_dir / "models" / name).is_dir():
                return run_dir / "models" / name
        raise InputError(f"{run_dir}/models: no trained model (run `launch.py ict` or `pretrain` first)")
    if (run_dir / "models" / spec).is_dir() or spec in ("ict", "realm"):
        return run_dir / "models" / spec
    return Path(spec)
