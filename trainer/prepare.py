"""`launch.py prepare`: corpus -> block store, and the pre-training and evaluation examples.

The synthetic-knowledge corpus (indexer/synthetic.py) is generated when `data.corpus` is empty.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from core.errors import InputError
from core.files import atomic_dir, atomic_write_json
from core.schema import to_dict
from indexer.blocks import BlockedChunks, BlockStore, build_block_store
from indexer.corpus_versions import reset_pointer
from indexer.synthetic import write_synthetic
from trainer import data as D
from trainer.config import TrainConfig


def prepare(cfg: TrainConfig, blocked_for: Callable[[str], BlockedChunks] | None = None,
            corpus_examples: Callable[[BlockStore], Iterator[D.Example]] | None = None) -> dict:
    """Writes run_dir/blocks, run_dir/examples/{train,eval}.parquet and run_dir/config.json; returns a summary.
    On this machine (prepare.workers processes) unless another engine (cluster/prepare_data.py: Ray Data)
    gives `blocked_for(corpus)`, the corpus's blocks, and `corpus_examples(store)`, its sentences with their
    salient spans, both in corpus order."""
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
                             cfg.blocks.max_title_len, cfg.data.max_doc_bytes, workers=workers,
                             blocked=blocked_for(corpus) if blocked_for else None)
    reset_pointer(run_dir)  # a new blocks/: an earlier update-corpus or reindex no longer applies
    store = BlockStore(run_dir / "blocks")
    counts = write_example_splits(cfg, store, pretrain, evalf, run_dir / "examples", corpus_examples)
    atomic_write_json(run_dir / "config.json", to_dict(cfg))
    return {**meta, **counts}


def write_example_splits(cfg: TrainConfig, store: BlockStore, pretrain: str, evalf: str, out_dir: Path,
                         corpus_examples: Callable[[BlockStore], Iterator[D.Example]] | None = None) -> dict:
    """Pre-training examples (the `pretrain` file's, or the corpus's own sentences) with their salient spans,
    split into train.parquet and eval.parquet under out_dir (atomic). Streams: examples are read, tagged (in
    prepare.workers processes) and written a row group at a time, so memory holds a chunk of examples plus
    the evaluation set, and what a split needs per example (data.eval_split=sentences: an 8-byte index each;
    documents: a byte per document)."""
    workers, spans = cfg.prepare.workers, cfg.masking.mode in ("salient", "uniform")  # uniform masks as many
    # wordpieces as the span has

    def source():
        if corpus_examples is not None and not pretrain:
            return corpus_examples(store)
        if not pretrain:  # the corpus's own sentences: split (and tagged) in the workers
            return D.stream_corpus_sentence_examples(store, cfg.masking.min_sentence_chars,
                                                     cfg.masking.ner if spans else None, workers)
        examples = D.iter_text_examples(pretrain, store)
        return D.stream_salient_spans(examples, cfg.masking.ner, workers) if spans else examples

    with atomic_dir(out_dir) as tmp:
        train = D.ExampleWriter(tmp / "train.parquet")
        if evalf:
            eval_ex = D.read_text_examples(evalf, store)
            eval_ex = D.attach_salient_spans(eval_ex, cfg.masking.ner, workers) if spans else eval_ex
            for ex in source():
                train.append(ex)
        elif cfg.data.eval_split == "documents":
            eval_ex = D.route_by_document(source(), store, cfg.data.eval_fraction, cfg.data.max_eval_examples,
                                          cfg.seed, train.append)
        else:  # a sample of all the examples: their number is known once they are all written (to a scratch file)
            scratch = D.ExampleWriter(tmp / "all.parquet")
            for ex in source():
                scratch.append(ex)
            scratch.close()
            held = D.eval_indices(scratch.rows, cfg.data.eval_fraction, cfg.data.max_eval_examples, cfg.seed)
            eval_ex = []
            for i, ex in enumerate(D.iter_example_file(tmp / "all.parquet")):
                (eval_ex.append if i in held else train.append)(ex)
            (tmp / "all.parquet").unlink()
        train.close()
        if not train.rows:
            raise InputError(f"{pretrain or store.manifest.get('corpus')}: no pre-training examples (no maskable "
                             f"spans found)")
        D.write_example_file(tmp / "eval.parquet", eval_ex)
    return {"train_examples": train.rows, "eval_examples": len(eval_ex)}
