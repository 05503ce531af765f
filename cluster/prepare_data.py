"""`launch.py prepare` with `prepare.engine=ray`: the corpus blocked and its sentences tagged on Ray Data.

The same block store and examples as the local engine (trainer/prepare.py), byte for byte: Ray Data reads the
corpus (`read_text` for JSONL, one row a line, so a row's place is its line; `read_parquet` for a Parquet file or
a directory of them, in name order), `map_batches` blocks documents in `prepare.workers` actors (each loads the
tokenizer once), and the driver consumes the batches in corpus order (`preserve_order`), numbering blocks and
writing the store a record batch at a time exactly as the local engine does. Salient spans of the corpus's own
sentences are tagged the same way, a range of block ids a batch, each actor reading the published store by
memory map. Nothing holds the corpus: Ray Data streams with bounded buffers, and the driver holds one batch.

Rows are validated in the actors with the local engine's own functions; an actor returns a bad row's message
(not an exception: Ray would wrap it in a stack trace) with a placeholder for its place, which the driver,
counting rows in order, fills in as `file:line` or `file:row N`, so errors read exactly as they do locally.
Duplicate ids are caught on the driver (8-byte hashes, indexer/blocks.DuplicateIds).

Ray Data, not a home-made scheduler: it streams between operators with backpressure, places actors across the
cluster, and retries failed tasks. A given `data.pretrain` file is read and tagged on the driver's node
(prepare.workers processes): its examples look up source ids in the store, which each actor would otherwise
have to index whole.
"""
from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import ray
import ray.data

from cluster.config import Config
from cluster.run import connect
from core.errors import InputError
from core.records import parse_jsonl_line, record_files
from indexer.blocks import DOC_CHUNK, BlockedChunks, BlockStore, DuplicateIds, document_from_row, split_document
from indexer.tokenizer import Vocab, load_tokenizer
from trainer import data as D
from trainer.prepare import prepare

WHERE = "\x00where\x00"  # a bad row's place, filled in by the driver
BLOCKED_SCHEMA = pa.schema([
    ("error", pa.string()), ("doc_id", pa.string()), ("title", pa.string()),
    ("texts", pa.list_(pa.string())), ("token_ids", pa.list_(pa.list_(pa.int32()))), ("path", pa.string()),
])


def prepare_on_ray(cfg: Config) -> dict:
    """`prepare` with Ray Data blocking the corpus and tagging its sentences (see the module docstring)."""
    # a CPU for each actor, and one for Ray Data's read tasks (else, on a 2-core machine with 2 workers, the
    # actors would hold every CPU and wait forever for rows)
    started = connect(cfg, cpus=cfg.prepare.workers + 1, gpus=0)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in corpus order: the ids and bytes of local
    ctx.enable_progress_bars = False
    try:
        spans = cfg.masking.mode in ("salient", "uniform")
        return prepare(cfg, blocked_for=lambda corpus: _blocked(cfg, corpus),
                       corpus_examples=lambda store: _corpus_examples(cfg, store, spans))
    finally:
        if started:
            ray.shutdown()


class _Blocker:
    """A Ray Data actor: records (JSONL lines or Parquet rows) -> one row each of its blocks, or its error."""

    def __init__(self, vocab_file: str, max_len: int, max_title_len: int, max_doc_bytes: int, jsonl: bool):
        self.tok = load_tokenizer(vocab_file)
        self.vocab = Vocab(self.tok)
        self.max_len, self.max_title_len, self.max_doc_bytes, self.jsonl = max_len, max_title_len, max_doc_bytes, jsonl

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {k: [] for k in BLOCKED_SCHEMA.names}
        paths = batch.column("path").to_pylist()
        rows = batch.column("text").to_pylist() if self.jsonl else batch.drop_columns(["path"]).to_pylist()
        for row, path in zip(rows, paths):
            doc, pieces, error = None, [], None
            try:
                obj = parse_jsonl_line(row.encode("utf-8", "surrogatepass"), WHERE) if self.jsonl else row
                if obj is not None:
                    doc = document_from_row(obj, WHERE, self.max_doc_bytes)
                    pieces = split_document(self.tok, self.vocab, doc, self.max_len, self.max_title_len)
            except InputError as e:
                error = str(e)
            out["error"].append(error)
            out["doc_id"].append(doc.doc_id if doc and not error else None)
            out["title"].append(doc.title if doc else None)
            out["texts"].append([t for t, _ in pieces])
            out["token_ids"].append([ids for _, ids in pieces])
            out["path"].append(path)
        return pa.table(out, schema=BLOCKED_SCHEMA)


def _blocked(cfg: Config, corpus: str) -> BlockedChunks:
    paths, jsonl = record_files(corpus)  # the local engine's files, in its order
    if jsonl and not paths[0].is_file():
        raise InputError(f"{paths[0]}: file not found")
    files = [str(f) for f in paths]
    max_doc_bytes = cfg.data.max_doc_bytes

    def run(vocab_file: str) -> Iterator[tuple[dict, dict]]:
        if jsonl:  # one row a line, blank lines kept: the driver's count is the line number
            ds = ray.data.read_text(files, drop_empty_lines=False, include_paths=True)
        else:
            ds = ray.data.read_parquet(files, include_paths=True)
        ds = ds.map_batches(_Blocker, batch_size=DOC_CHUNK, batch_format="pyarrow", num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(size=cfg.prepare.workers),
                            fn_constructor_args=(vocab_file, cfg.blocks.max_len, cfg.blocks.max_title_len,
                                                 max_doc_bytes, jsonl))
        ids = DuplicateIds()
        rows_of: dict[str, int] = {}
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                cols = {"block_id": [], "doc_id": [], "title": [], "text": [], "token_ids": []}
                doc_cols = {"doc_id": [], "first_block": [], "num_blocks": []}
                for r in batch.to_pylist():
                    n = rows_of.get(r["path"], 0)
                    rows_of[r["path"]] = n + 1
                    if r["error"]:
                        where = f"{r['path']}:{n + 1}" if jsonl else f"{r['path']}:row {n}"
                        raise InputError(r["error"].replace(WHERE, where))
                    if r["doc_id"] is None:  # a blank line
                        continue
                    ids.add(r["doc_id"])
                    doc_cols["doc_id"].append(r["doc_id"])
                    doc_cols["first_block"].append(len(cols["block_id"]))
                    doc_cols["num_blocks"].append(len(r["texts"]))
                    for text, tokens in zip(r["texts"], r["token_ids"]):
                        cols["block_id"].append(len(cols["block_id"]))
                        cols["doc_id"].append(r["doc_id"])
                        cols["title"].append(r["title"])
                        cols["text"].append(text)
                        cols["token_ids"].append(tokens)
                yield cols, doc_cols
        except ray.exceptions.RayError as e:  # e.g. a file Ray cannot decode: one line, not Ray's trace
            raise InputError(f"{corpus}: Ray Data could not read it: {_last_line(e)}") from None
        ids.check(corpus, max_doc_bytes)
    return run


class _SentenceTagger:
    """A Ray Data actor: a batch of block ids -> the examples of their sentences, salient spans tagged (those
    without any dropped), as the local engine makes them."""

    def __init__(self, store_dir: str, min_chars: int, ner: str, spans: bool):
        self.store = BlockStore(store_dir)
        self.min_chars, self.ner, self.spans = min_chars, ner, spans

    def __call__(self, batch: dict) -> pa.Table:
        texts, blocks, spans = D.block_sentences([(b, self.store.text(b)) for b in batch["id"].tolist()],
                                                 self.min_chars, self.ner if self.spans else None)
        return pa.table({"text": texts, "spans": spans, "fixed_span": [False] * len(texts),
                         "exclude_blocks": [[b] for b in blocks], "gold_blocks": [[] for _ in texts]},
                        schema=D.EXAMPLE_SCHEMA)


def _corpus_examples(cfg: Config, store: BlockStore, spans: bool) -> Iterator[D.Example]:
    ds = ray.data.range(len(store)).map_batches(
        _SentenceTagger, batch_size=D.SENTENCE_BLOCK_CHUNK, batch_format="numpy", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.prepare.workers),
        fn_constructor_args=(str(store.dir), cfg.masking.min_sentence_chars, cfg.masking.ner, spans))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            yield D.Example(**row)


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__

