"""The one place a BertModel comes from: a local checkpoint directory, the shipped MiniLM, or a
random config. Model code (trainer/model.py) receives BERTs and never looks for weights."""
from __future__ import annotations

import os
from collections.abc import Callable

from safetensors import SafetensorError
from transformers import BertConfig, BertModel

from core.assets import minilm_dir
from core.errors import InputError


def load_bert(path: str | os.PathLike) -> BertModel:
    """A BertModel saved with `save_pretrained` (safetensors); a damaged or foreign one fails in one line."""
    try:
        return BertModel.from_pretrained(str(path), add_pooling_layer=False, attn_implementation="sdpa",
                                         local_files_only=True)
    except (OSError, ValueError, SafetensorError) as e:
        raise InputError(f"{path}: corrupt or foreign BERT checkpoint: {str(e).splitlines()[0]}") from None


def random_bert(vocab_size: int, num_layers: int = 2, hidden_size: int = 128, num_heads: int = 2,
                intermediate_size: int = 512) -> BertModel:
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                     num_attention_heads=num_heads, intermediate_size=intermediate_size,
                     max_position_embeddings=512, attn_implementation="sdpa")
    return BertModel(cfg, add_pooling_layer=False)


def init_bert(init: str, vocab_size: int, num_layers: int = 0, hidden_size: int = 128, num_heads: int = 2,
              intermediate_size: int = 512) -> BertModel:
    """`model.init`: "random" (a config: the sizes given, 2 layers for 0), "minilm" or a checkpoint
    directory (its first `num_layers` layers; 0 = all)."""
    if init == "random":
        return random_bert(vocab_size, num_layers or 2, hidden_size, num_heads, intermediate_size)
    path = minilm_dir() if init == "minilm" else init
    bert = load_bert(path)
    if bert.config.vocab_size != vocab_size:
        raise InputError(f"{path}: vocabulary of {bert.config.vocab_size} tokens does not match the block "
                         f"store's {vocab_size}")
    if num_layers and num_layers < bert.config.num_hidden_layers:
        bert.encoder.layer = bert.encoder.layer[:num_layers]
        bert.config.num_hidden_layers = num_layers
    return bert


def bert_factory(init: str, vocab_size: int, hidden_size: int = 128, num_heads: int = 2,
                 intermediate_size: int = 512) -> Callable[[int], BertModel]:
    """`layers -> init_bert(init, ...)`: what `trainer.model.build_realm` builds its BERTs with."""
    return lambda layers: init_bert(init, vocab_size, layers, hidden_size, num_heads, intermediate_size)
