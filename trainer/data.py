"""Examples and batches: pre-training (masked salient spans), ICT, and their tensors.

A pre-training example is a sentence with the character spans that may be masked, the blocks it
must not retrieve (trivial-retrieval exclusion) and, when known, the blocks holding its
evidence (for recall). `prepare` writes them to run_dir/examples/{train,eval}.parquet.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from core.errors import InputError
from core.files import atomic_dir, atomic_file
from core.parallel import chunked, ordered_map
from core.records import optional_str, read_jsonl, require_str
from indexer.blocks import BlockStore
from indexer.embed import pad_batch
from indexer.tokenizer import Vocab
from trainer import masking
from trainer.masking import random_token_span, split_sentences, tag_salient_spans

if TYPE_CHECKING:  # the model (transformers, ~3 s to import) is not needed to prepare examples
    from trainer.model import RealmBatch

MAX_MASKED_TOKENS = 12  # longer spans are rare and mostly noise from the tagger
ICT_MAX_TRIES = 50  # draws per ICT example before a batch settles for fewer (blocks of one sentence have none)

EXAMPLE_SCHEMA = pa.schema([
    ("text", pa.string()), ("spans", pa.list_(pa.list_(pa.int32()))), ("fixed_span", pa.bool_()),
    ("exclude_blocks", pa.list_(pa.int64())), ("gold_blocks", pa.list_(pa.int64())),
])


@dataclass
class Example:
    text: str
    spans: list = field(default_factory=list)      # [[start, end], ...] character spans to mask
    fixed_span: bool = False                        # a user-given `answer`: always mask spans[0]
    exclude_blocks: list = field(default_factory=list)
    gold_blocks: list = field(default_factory=list)


# ---- building examples (prepare) ---------------------------------------------------------------

def _doc_blocks(store: BlockStore, doc_id: str | None, where: str, field_name: str) -> list[int]:
    if doc_id is None:
        return []
    blocks = store.doc_blocks(doc_id)
    if len(blocks) == 0:
        raise InputError(f"{where}: {field_name} '{doc_id}' is not an id in the corpus")
    return list(blocks)


def answer_span(text: str, answer: str, where: str) -> list[int]:
    """[start, end] of the first occurrence of `answer` in `text`: the span that is masked."""
    start = text.find(answer) if answer.strip() else -1
    if start < 0:
        raise InputError(f"{where}: answer {answer!r} is not a non-empty substring of text")
    return [start, start + len(answer)]


def iter_text_examples(path: str, store: BlockStore) -> Iterator[Example]:
    """Pre-training/eval text JSONL, one example at a time: text [, answer, source_id, gold_id]; errors name
    file:line."""
    empty = True
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        text = require_str(row, "text", where)
        answer = optional_str(row, "answer", where)
        ex = Example(text=text,
                     exclude_blocks=_doc_blocks(store, optional_str(row, "source_id", where), where, "source_id"),
                     gold_blocks=_doc_blocks(store, optional_str(row, "gold_id", where), where, "gold_id"))
        if answer is not None:
            ex.spans, ex.fixed_span = [answer_span(text, answer, where)], True
        empty = False
        yield ex
    if empty:
        raise InputError(f"{path}: no examples")


def read_text_examples(path: str, store: BlockStore) -> list[Example]:
    """`iter_text_examples` as a list (evaluation files)."""
    return list(iter_text_examples(path, store))


SENTENCE_BLOCK_CHUNK = 256  # blocks whose sentences are split and tagged in one call, by either engine's workers


def stream_corpus_sentence_examples(store: BlockStore, min_chars: int, ner: str | None = None, workers: int = 1
                                    ) -> Iterator[Example]:
    """The corpus's own sentences, each excluding its own block, in corpus order; with `ner`, their salient spans
    tagged and those without any dropped. Blocks are read a record batch at a time and cut into chunks of
    SENTENCE_BLOCK_CHUNK here; `workers` processes split and tag them (block_sentences), so the result is the
    same for any number of workers."""
    def chunks():
        bar = tqdm(total=len(store), desc="sentences", unit="block", mininterval=2, disable=not sys.stderr.isatty())
        for batch in store.iter_batches(["block_id", "text"]):
            yield from chunked(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()), SENTENCE_BLOCK_CHUNK)
            bar.update(batch.num_rows)
        bar.close()

    for texts, blocks, spans in ordered_map(partial(block_sentences, min_chars=min_chars, ner=ner), chunks(), workers):
        for text, block, s in zip(texts, blocks, spans):
            yield Example(text=text, spans=s, exclude_blocks=[block])


def block_sentences(blocks: list[tuple[int, str]], min_chars: int, ner: str | None
                    ) -> tuple[list[str], list[int], list[list[list[int]]]]:
    """The sentences of some (block id, text)s, as columns: texts, their blocks, and (with `ner`, tagged in one
    call; those without a salient span dropped) their spans. One call of the local engine's workers and of the
    Ray Data engine's actors; columns of plain values, which cross a process boundary far faster than objects."""
    texts, ids = [], []
    for block_id, text in blocks:
        for s, e in split_sentences(text):
            if e - s >= min_chars:
                texts.append(text[s:e])
                ids.append(block_id)
    if ner is None:
        return texts, ids, [[] for _ in texts]
    tagged = [(t, b, [list(x) for x in spans]) for t, b, spans in zip(texts, ids, tag_salient_spans(texts, ner))
              if spans]
    return [t for t, _, _ in tagged], [b for _, b, _ in tagged], [s for _, _, s in tagged]


def stream_salient_spans(examples: Iterable[Example], ner: str, workers: int = 1) -> Iterator[Example]:
    """Examples with `spans` filled with entity/date spans (tagged masking.NER_CHUNK at a time in `workers` processes,
    in order), those without any dropped; an example with a given answer keeps it. Streams."""
    def texts(chunk):  # only the texts go to a worker, and come back as spans in the same order
        return [ex.text for ex in chunk if not ex.fixed_span]

    pending: deque[list[Example]] = deque()

    def feed():
        for chunk in chunked(examples, masking.NER_CHUNK):  # NER_CHUNK read at call time (tests shrink it)
            pending.append(chunk)
            yield texts(chunk)

    for spans in ordered_map(partial(tag_salient_spans, ner=ner), feed(), workers):
        chunk = pending.popleft()
        todo = iter(spans)
        for ex in chunk:
            if not ex.fixed_span:
                ex.spans = [list(s) for s in next(todo)]
            if ex.spans:
                yield ex


def attach_salient_spans(examples: list[Example], ner: str, workers: int = 1) -> list[Example]:
    """`stream_salient_spans` as a list."""
    return list(stream_salient_spans(examples, ner, workers))


def eval_indices(n: int, fraction: float, max_eval: int, seed: int) -> set[int]:
    """The seeded evaluation sample of n examples (data.eval_split=sentences)."""
    n_eval = min(max_eval, int(round(n * fraction)))
    return set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())


def held_out_documents(store: BlockStore, fraction: float, seed: int) -> np.ndarray:
    """A seeded `fraction` of the store's documents (data.eval_split=documents), as a mask over store order."""
    n = store.num_docs
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:int(round(n * fraction))]] = True
    return held


def route_by_document(examples: Iterable[Example], store: BlockStore, fraction: float, max_eval: int, seed: int,
                      train: Callable[[Example], None]) -> list[Example]:
    """A `fraction` of the documents (seeded) held out whole: none of their sentences is trained on, and up to
    `max_eval` of them (in corpus order) are the evaluation set, returned. An example's document is that of the
    block it excludes (its own: a corpus sentence, or a `source_id`); examples without one always train. Streams:
    each training example goes to `train` as it comes."""
    held = held_out_documents(store, fraction, seed)
    held_out: list[Example] = []
    any_example = any_held = False
    last_block, doc = None, -1  # a block's sentences come together: its document is looked up once
    for ex in examples:
        any_example = True
        block = ex.exclude_blocks[0] if ex.exclude_blocks else None
        if block != last_block:
            last_block, doc = block, (-1 if block is None else store.doc_index(block))
        if doc >= 0 and held[doc]:
            any_held = True
            if len(held_out) < max_eval:
                held_out.append(ex)
        else:
            train(ex)
    if any_example and not any_held:
        raise InputError(f"config key 'data.eval_fraction': {fraction} of {store.num_docs} documents holds out no "
                         f"example (data.eval_split=documents)")
    return held_out


EXAMPLE_ROW_GROUP = 1 << 16  # examples per Parquet row group, however they arrived


class ExampleWriter:
    """Examples appended one at a time, written to Parquet a row group of EXAMPLE_ROW_GROUP at a time: memory
    holds one row group, and the file's bytes depend only on its examples."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(str(path), EXAMPLE_SCHEMA)
        self.pending: list[Example] = []
        self.rows = 0

    def append(self, ex: Example) -> None:
        self.pending.append(ex)
        self.rows += 1
        if len(self.pending) == EXAMPLE_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        cols = {k: [getattr(ex, k) for ex in self.pending] for k in EXAMPLE_SCHEMA.names}
        self.writer.write_table(pa.table(cols, schema=EXAMPLE_SCHEMA))
        self.pending = []

    def close(self) -> None:
        if self.pending or self.rows == 0:
            self._flush()
        self.writer.close()


def iter_example_file(path: Path) -> Iterator[Example]:
    """The examples of a Parquet file, a row group at a time."""
    f = pq.ParquetFile(path)
    for i in range(f.num_row_groups):
        for row in f.read_row_group(i).to_pylist():
            yield Example(**row)


def write_example_file(path: Path, examples: Iterable[Example]) -> int:
    w = ExampleWriter(path)
    for ex in examples:
        w.append(ex)
    w.close()
    return w.rows


def write_examples(directory: Path, splits: dict[str, list[Example]]) -> None:
    with atomic_dir(directory) as tmp:
        for name, examples in splits.items():
            write_example_file(tmp / f"{name}.parquet", examples)


def read_examples(path: str | os.PathLike) -> list[Example]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: not found (run `launch.py prepare` first)")
    return [Example(**row) for row in pq.read_table(p).to_pylist()]


class ExampleTable(Sequence):
    """The examples of a Parquet file by index, without loading them: a memory-mapped Arrow IPC copy beside it
    (`train.arrow`, written once, a row group at a time, and rewritten when the Parquet file changes), so the
    trainer draws any example in O(1) and holds only the pages it touched, however many examples there are.
    Draws are `examples[i]` as from `read_examples`'s list: the same seed, the same examples."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: not found (run `launch.py prepare` first)")
        cache = p.with_suffix(".arrow")
        stamp = f"{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()
        table = _open_arrow(cache)
        if table is None or (table.schema.metadata or {}).get(b"source") != stamp:
            with atomic_file(cache) as tmp:
                source = pq.ParquetFile(p)
                schema = source.schema_arrow.with_metadata({b"source": stamp})
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                    for i in range(source.num_row_groups):
                        writer.write_table(source.read_row_group(i).replace_schema_metadata(schema.metadata))
            table = _open_arrow(cache)
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        return Example(**self.table.slice(i % len(self), 1).to_pylist()[0])


def _open_arrow(path: Path) -> pa.Table | None:
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowInvalid):
        return None


# ---- masking a sentence into a query -------------------------------------------------------------

@dataclass
class MaskedQuery:
    ids: np.ndarray          # [CLS] x-with-[MASK]s [SEP], int64
    positions: np.ndarray    # indices of the [MASK] tokens in ids
    targets: np.ndarray      # the true token ids there
    exclude_blocks: list
    gold_blocks: list


def _given_span_tokens(ex: Example, offsets: list, rng: np.random.Generator) -> tuple[int, int] | None:
    """Wordpieces [t0, t1) of the example's salient/given span (a random one of several that fit), or None."""
    spans = ex.spans[:1] if ex.fixed_span else [ex.spans[i] for i in rng.permutation(len(ex.spans))]
    for s, e in spans:
        toks = [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
        if toks and toks[-1] - toks[0] + 1 <= MAX_MASKED_TOKENS:
            return toks[0], toks[-1] + 1
    return None


def mask_example(ex: Example, tok, vocab: Vocab, max_len: int, rng: np.random.Generator, mode: str,
                 random_span_max: int = 3, mask_given: bool = True) -> MaskedQuery | None:
    """Tokenize x, mask one span (a salient/given span, or a random one) or, `uniform`, single wordpieces;
    fit x into max_len. `mask_given=False` (pre-training in random/uniform mode) masks the mode's own choice
    even where the example names its answer: the synthetic statements all do, and the ablation must change
    what is masked; evaluation keeps scoring the given answer."""
    enc = tok.encode(ex.text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    if not ids:
        return None
    own_choice = mode in ("random", "uniform") and not (ex.fixed_span and mask_given)
    body = max_len - 2
    if mode == "uniform" and own_choice:
        # as many wordpieces as the salient span would mask (1..random_span_max without one), each drawn
        # on its own anywhere in the window: the paper's "random uniform masks"
        given = _given_span_tokens(ex, offsets, rng) if ex.spans else None
        n = given[1] - given[0] if given else int(rng.integers(1, random_span_max + 1))
        lo = int(rng.integers(0, len(ids) - body + 1)) if len(ids) > body else 0
        width = min(body, len(ids) - lo)
        pos = np.sort(rng.choice(width, size=min(n, width), replace=False))
        window = np.array(ids[lo:lo + body], dtype=np.int64)
    else:
        if own_choice:
            t0, t1 = random_token_span(len(ids), enc.word_ids, random_span_max, rng)
        else:
            span = _given_span_tokens(ex, offsets, rng)
            if span is None:
                return None
            t0, t1 = span
        lo = 0
        if len(ids) > body:  # keep a window of x around the span
            lo = max(0, min(t0 - (body - (t1 - t0)) // 2, len(ids) - body))
        window = np.array(ids[lo:lo + body], dtype=np.int64)
        pos = np.arange(t0 - lo, t1 - lo)
    targets = window[pos].copy()
    window[pos] = vocab.mask
    q = np.concatenate([[vocab.cls], window, [vocab.sep]]).astype(np.int64)
    return MaskedQuery(q, pos + 1, targets, list(ex.exclude_blocks), list(ex.gold_blocks))


def reader_input(query_ids: np.ndarray, block_tokens: np.ndarray | None, max_len: int, sep: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The reader's input for one (x, z): `[CLS] x [SEP] z [SEP]` truncated to max_len (z = the block
    without its [CLS]; None = x alone) and its token types (0 over x, 1 over z), both int64 [L].
    The one assembly for pre-training (collate_realm) and Open-QA (trainer/qa_batch.py)."""
    if block_tokens is None or len(block_tokens) == 0:
        seq = query_ids[:max_len]
    else:
        z = np.asarray(block_tokens[1:], dtype=np.int64)
        seq = np.concatenate([query_ids, z])[:max_len]
        seq[-1] = sep
    return seq, np.r_[np.zeros(len(query_ids), np.int64), np.ones(len(seq) - len(query_ids), np.int64)]


def collate_realm(queries: list[MaskedQuery], candidates: np.ndarray, store: BlockStore, vocab: Vocab,
                  reader_max_len: int) -> RealmBatch:
    """Tensors for B queries and their [B, K] candidate block ids (-1 = no candidate)."""
    from trainer.model import RealmBatch

    B, K = candidates.shape
    valid = candidates >= 0
    q_ids, q_mask = pad_batch([q.ids for q in queries], vocab.pad)
    blocks = [[store.tokens(int(c)) if c >= 0 else np.array([vocab.cls, vocab.sep], np.int32) for c in row]
              for row in candidates]
    c_ids, c_mask = pad_batch([b for row in blocks for b in row], vocab.pad)
    reader_seqs, reader_types = [], []
    for q, row in zip(queries, blocks):
        for z in row:
            seq, types = reader_input(q.ids, z, reader_max_len, vocab.sep)
            reader_seqs.append(seq)
            reader_types.append(types)
    r_ids, r_mask = pad_batch(reader_seqs, vocab.pad)
    r_types, _ = pad_batch(reader_types, 0)
    M = max(len(q.positions) for q in queries)
    positions = np.zeros((B, M), np.int64)
    targets = np.zeros((B, M), np.int64)
    target_mask = np.zeros((B, M), np.float32)
    for i, q in enumerate(queries):
        n = len(q.positions)
        positions[i, :n], targets[i, :n], target_mask[i, :n] = q.positions, q.targets, 1.0
    return RealmBatch(q_ids, q_mask, c_ids.view(B, K, -1), c_mask.view(B, K, -1), torch.from_numpy(valid),
                      r_ids.view(B, K, -1), r_mask.view(B, K, -1), r_types.view(B, K, -1),
                      torch.from_numpy(positions), torch.from_numpy(targets), torch.from_numpy(target_mask))


def own_blocks(queries: list[MaskedQuery]) -> np.ndarray:
    """[B, 1] candidates: each query's own (first excluded) block, -1 (none: the null document alone)
    for a query without one (user text without source_id)."""
    return np.array([[q.exclude_blocks[0] if q.exclude_blocks else -1] for q in queries], np.int64)


def exclusion_matrix(queries: list[MaskedQuery]) -> np.ndarray:
    """[B, E] int64 excluded block ids, -1 padded."""
    E = max([len(q.exclude_blocks) for q in queries] + [1])
    out = np.full((len(queries), E), -1, np.int64)
    for i, q in enumerate(queries):
        out[i, :len(q.exclude_blocks)] = q.exclude_blocks
    return out


# ---- Inverse Cloze Task ------------------------------------------------------------------------------

def ict_pair(store: BlockStore, tok, vocab: Vocab, block_id: int, rng: np.random.Generator, keep_prob: float,
             max_query_len: int, min_chars: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(query sentence ids, context block ids) for one block, or None if it has < 2 sentences.

    The sentence is removed from its block except with probability keep_prob (ORQA), so the
    retriever learns topical, not only lexical, matching.
    """
    text = store.text(block_id)
    sents = split_sentences(text)
    usable = [s for s in sents if s[1] - s[0] >= min_chars]
    if len(sents) < 2 or not usable:
        return None
    s, e = usable[int(rng.integers(len(usable)))]
    query = tok.encode(text[s:e], add_special_tokens=False).ids[:max_query_len - 2]
    q = np.array([vocab.cls] + query + [vocab.sep], np.int64)
    if rng.random() < keep_prob:
        return q, np.asarray(store.tokens(block_id), np.int64)
    block = store.tokens(block_id)
    title_end = int(np.nonzero(block == vocab.sep)[0][0])  # [CLS] title [SEP] ...
    rest = (text[:s] + " " + text[e:]).strip()
    body = tok.encode(rest, add_special_tokens=False).ids[:len(block) - title_end - 2]
    ctx = np.concatenate([block[:title_end + 1], body, [vocab.sep]]).astype(np.int64)
    return q, ctx


def ict_batch(store: BlockStore, tok, vocab: Vocab, batch_size: int, rng: np.random.Generator, keep_prob: float,
              max_query_len: int, min_chars: int) -> tuple[torch.Tensor, ...]:
    """B (query, context) pairs from distinct blocks: q_ids, q_mask, c_ids, c_mask."""
    queries, contexts, used = [], [], set()
    tries = 0
    while len(queries) < batch_size and tries < batch_size * ICT_MAX_TRIES:
        tries += 1
        b = int(rng.integers(len(store)))
        if b in used:
            continue
        pair = ict_pair(store, tok, vocab, b, rng, keep_prob, max_query_len, min_chars)
        if pair is None:
            continue
        used.add(b)
        queries.append(pair[0])
        contexts.append(pair[1])
    if len(queries) < 2:
        raise InputError(f"{store.dir}: too few blocks with two or more sentences for the Inverse Cloze Task")
    return (*pad_batch(queries, vocab.pad), *pad_batch(contexts, vocab.pad))


def span_hits(queries: list[MaskedQuery], cand: np.ndarray, store: BlockStore) -> list[bool]:
    """For each query: do its masked tokens occur, in order, in one of its candidate blocks? Whether a reader
    that copies could fill the span from what was retrieved (the retriever's signal)."""
    def contains(block: np.ndarray, span: np.ndarray) -> bool:
        starts = np.flatnonzero(block[:len(block) - len(span) + 1] == span[0])
        return any(np.array_equal(block[s:s + len(span)], span) for s in starts)

    return [any(contains(np.asarray(store.tokens(int(c))), q.targets) for c in row if c >= 0)
            for q, row in zip(queries, cand)]


def span_in_candidates(queries: list[MaskedQuery], cand: np.ndarray, store: BlockStore) -> float:
    """Fraction of queries whose span is in one of their candidates (`span_hits`)."""
    hits = span_hits(queries, cand, store)
    return float(np.mean(hits)) if hits else 0.0


def gold_hits(queries: list[MaskedQuery], cand: np.ndarray) -> list[bool]:
    """For each query that knows its gold blocks: is one of them among its candidates (cand [B, k])?"""
    return [bool(set(row.tolist()) & set(q.gold_blocks)) for q, row in zip(queries, cand) if q.gold_blocks]
