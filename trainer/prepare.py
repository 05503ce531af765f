"""`launch.py prepare`: corpus -> block store, and the pre-training and evaluation examples.

The synthetic-knowledge corpus (indexer/synthetic.py) is generated when `data.corpus` is empty.
"""
from __future__ import annotations

from pathlib import Path

from core.errors import InputError
from core.files import atomic_write_json
from core.schema import to_dict
from indexer.blocks import BlockStore, build_block_store
from indexer.corpus_versions import reset_pointer
from indexer.synthetic import write_synthetic
from trainer import data as D
from trainer.config import TrainConfig


def prepare(cfg: TrainConfig) -> dict:
    """Writes run_dir/blocks, run_dir/examples/{train,eval}.parquet and run_dir/config.json; returns a summary."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    corpus, pretrain, evalf = cfg.data.corpus, cfg.data.pretrain, cfg.data.eval
    if not corpus:  # the embedded default: a generated synthetic-knowledge corpus
        paths = write_synthetic(run_dir / "data", cfg.data.synthetic_entities, cfg.seed,
                                cfg.data.synthetic_relations, cfg.data.synthetic_phrasing)
        corpus, pretrain, evalf = str(paths["corpus"]), str(paths["pretrain"]), str(paths["eval"])
    if evalf and cfg.data.eval_split != "sentences":
        raise InputError(f"config key 'data.eval_split': {cfg.data.eval_split} splits the pre-training examples, "
                         f"but the evaluation set is given ({'data.eval' if cfg.data.eval else 'the synthetic eval'}"
                         f" file {evalf})")
    workers = cfg.prepare.workers
    meta = build_block_store(corpus, run_dir / "blocks", cfg.blocks.tokenizer, cfg.blocks.max_len,
                             cfg.blocks.max_title_len, cfg.data.max_doc_bytes, workers=workers)
    reset_pointer(run_dir)  # a new blocks/: an earlier update-corpus or reindex no longer applies
    store = BlockStore(run_dir / "blocks")
    if pretrain:
        train = D.read_text_examples(pretrain, store)
    else:
        train = D.corpus_sentence_examples(store, cfg.masking.min_sentence_chars)
    eval_ex = D.read_text_examples(evalf, store) if evalf else None
    if cfg.masking.mode in ("salient", "uniform"):  # uniform masks as many wordpieces as the span has
        train = D.attach_salient_spans(train, cfg.masking.ner, workers)
        eval_ex = D.attach_salient_spans(eval_ex, cfg.masking.ner, workers) if eval_ex is not None else None
    if eval_ex is None and cfg.data.eval_split == "documents":
        train, eval_ex = D.split_by_document(train, store, cfg.data.eval_fraction, cfg.data.max_eval_examples, cfg.seed)
    elif eval_ex is None:
        train, eval_ex = D.split_train_eval(train, cfg.data.eval_fraction, cfg.data.max_eval_examples, cfg.seed)
    if not train:
        raise InputError(f"{pretrain or corpus}: no pre-training examples (no maskable spans found)")
    D.write_examples(run_dir / "examples", {"train": train, "eval": eval_ex})
    atomic_write_json(run_dir / "config.json", to_dict(cfg))
    return {**meta, "train_examples": len(train), "eval_examples": len(eval_ex)}
