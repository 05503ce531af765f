"""REALM pre-training step throughput at k=8 candidates + the null document, split into its parts.

One step, as trainer/pretrain.py's train_loop runs it (the batch is synthesized, so data loading and
collation are not measured):
  (a) retrieval     query embedding (no grad) + ShardedIndex search over N random embeddings
  (b) re-encode     model.relevance: query tower + doc tower over the K candidates (with grad)
  (c) reader        the rest of REALM.forward: KAE over [CLS] x [SEP] z [SEP] and the null doc, the loss
  (d) bwd+opt       TorchEngine.step: backward, gradient clipping, AdamW

    python bench/train_step.py             # GPU: BERT-base shapes, bf16 autocast; CPU: a small shape
    python bench/train_step.py --smoke     # tiny shapes, seconds (CI)
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.common  # noqa: E402,F401  first: --threads must reach BLAS/OpenMP before numpy and torch load

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    SegmentTimer,
    add_common_args,
    apply_common_args,
    bert_encoder_flops,
    count,
    fmt,
    int_list,
    mfu,
    peak_bf16_flops,
    print_table,
    write_results,
)
from bench.topk import TorchTopK  # noqa: E402
from trainer.bert import bert_factory  # noqa: E402
from trainer.engine import TorchEngine, param_groups  # noqa: E402
from trainer.model import REALM, RealmBatch, build_realm  # noqa: E402
from trainer.pretrain import FRESH_HEADS  # noqa: E402

VOCAB = 30522
CLS, SEP, MASK = 101, 102, 103  # uncased BERT vocabulary ids
PARTS = ("retrieval", "re-encode", "reader", "bwd+opt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--init", default="random", help="random (shape from the flags) | minilm")
    p.add_argument("--layers", type=int, help="query/doc encoder layers (default: 12 on GPU, 2 on CPU)")
    p.add_argument("--reader-layers", type=int, help="reader layers (default: --layers)")
    p.add_argument("--hidden", type=int, help="hidden size (default: 768 on GPU, 128 on CPU)")
    p.add_argument("--heads", type=int, help="attention heads (default: 12 on GPU, 2 on CPU)")
    p.add_argument("--intermediate", type=int, help="FFN size (default: 4 x hidden)")
    p.add_argument("--batch-sizes", type=int_list, help="queries per step, comma list (default: 4,8,16 GPU; 2 CPU)")
    p.add_argument("--k", type=int, default=8, help="retrieved candidates per query (+ the null document)")
    p.add_argument("--query-len", type=int, default=64, help="Lq: query tokens, [CLS] and [SEP] included")
    p.add_argument("--masked", type=int, default=4, help="M: masked positions per query")
    p.add_argument("--doc-len", type=int, default=288, help="Ld: tokens per candidate block")
    p.add_argument("--reader-len", type=int, default=352, help="cap on the reader input [CLS] x [SEP] z [SEP]")
    p.add_argument("--index-rows", type=count, help="N embeddings in the index (default: 1e6 GPU, 1e5 CPU)")
    p.add_argument("--shards", type=int, default=2, help="ShardedIndex shards")
    p.add_argument("--index", choices=["auto", "sharded", "torch"], default="auto",
                   help="retrieval index: the faiss ShardedIndex, or exact torch search on --device "
                        "(auto: sharded when faiss is installed; the GPU image has none)")
    p.add_argument("--dim", type=int, default=128, help="retrieval embedding size")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "bf16w"], default="auto",
                   help="bf16 autocast over fp32 weights (auto: on CUDA), plain fp32, or bf16w: the model's "
                        "weights in bf16 (DeepSpeed's bf16 compute, without its fp32 master-weight update)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the three encoders (query, doc, reader) before timing")
    p.add_argument("--steps", type=int, help="timed steps per batch size (median reported; default 5 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per batch size")
    a = p.parse_args(argv)
    apply_common_args(a)
    gpu = a.device.type == "cuda"
    if a.smoke:
        a.layers, a.hidden, a.heads, a.intermediate = a.layers or 1, a.hidden or 32, a.heads or 2, a.intermediate or 64
        a.batch_sizes, a.index_rows = a.batch_sizes or [1], a.index_rows or 1000
        a.steps, a.warmup = 1, 1
    a.layers = a.layers or (0 if a.init != "random" else 12 if gpu else 2)
    a.reader_layers = a.reader_layers or a.layers
    a.hidden = a.hidden or (768 if gpu else 128)
    a.heads = a.heads or (12 if gpu else 2)
    a.intermediate = a.intermediate or 4 * a.hidden
    a.batch_sizes = a.batch_sizes or ([4, 8, 16] if gpu else [2])
    a.index_rows = a.index_rows or (1_000_000 if gpu else 100_000)
    a.steps = a.steps or (5 if gpu else 3)
    if a.index == "auto":
        try:
            import faiss  # noqa: F401
            a.index = "sharded"
        except ImportError:
            a.index = "torch"
    a.bf16 = a.precision == "bf16" or (a.precision == "auto" and gpu)
    a.bf16w = a.precision == "bf16w"
    if (a.bf16 or a.bf16w) and not gpu and not a.smoke:  # the smoke only checks the code path
        p.error("--precision bf16 is for CUDA (the trainer's CPU path is fp32)")
    if not 0 < a.masked <= a.query_len - 2:
        p.error("--masked must be between 1 and --query-len - 2")
    return a


def synth_batch(B: int, K: int, Lq: int, M: int, Ld: int, Lr: int, g: torch.Generator) -> RealmBatch:
    """A RealmBatch of random ids shaped like trainer.data.collate_realm's output (no padding)."""
    def rand_ids(*shape: int) -> torch.Tensor:
        return torch.randint(1000, VOCAB, shape, generator=g)

    q = rand_ids(B, Lq)
    q[:, 0], q[:, -1] = CLS, SEP
    positions = torch.rand(B, Lq - 2, generator=g).argsort(1)[:, :M].sort(1).values + 1  # distinct, inside x
    targets = q.gather(1, positions)
    q.scatter_(1, positions, MASK)
    cand = rand_ids(B, K, Ld)
    cand[..., 0], cand[..., -1] = CLS, SEP
    # [CLS] x [SEP] z [SEP]: x keeps its own [CLS]/[SEP], z drops its [CLS]; capped at Lr, ends in [SEP].
    reader = torch.cat([q.unsqueeze(1).expand(B, K, Lq), cand[..., 1:]], dim=-1)[..., :Lr].clone()
    reader[..., -1] = SEP
    types = torch.zeros_like(reader)
    types[..., Lq:] = 1
    ones = torch.ones_like
    return RealmBatch(q, ones(q), cand, ones(cand), torch.ones(B, K, dtype=torch.bool), reader, ones(reader),
                      types, positions, targets, torch.ones(B, M))


class TorchIndex:
    """Exact top-k on the torch device (bench/topk.py's TorchTopK) with search_excluding's semantics:
    ask for k + E, drop excluded ids, keep k. For machines without faiss."""

    def __init__(self, emb: np.ndarray, device: torch.device):
        self.emb, self.rows = torch.from_numpy(emb).to(device), len(emb)

    def search(self, q: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = TorchTopK(self.emb, torch.float32, k + exclude.shape[1], 1)(q)
        keep = ~((ids[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)).any(-1)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept ids first, best first
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def step_flops(a: argparse.Namespace, B: int, Lr: int, cfg) -> float:
    """Matmul FLOPs of one training step: 3x the forward of every encoder pass with grad, 1x retrieval."""
    h, inter, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    rl, dl = a.layers_real, a.reader_layers_real
    fwd_grad = (bert_encoder_flops(B, a.query_len, rl, h, inter)                 # query tower (relevance)
                + bert_encoder_flops(B * a.k, a.doc_len, rl, h, inter)           # doc tower, K candidates
                + bert_encoder_flops(B * a.k, Lr, dl, h, inter)                  # reader over x + z
                + bert_encoder_flops(B, a.query_len, dl, h, inter)               # reader, null doc
                + B * (a.k + 1) * a.masked * (2 * h * h + 2 * h * V))            # MLM head at masked positions
    retrieval = bert_encoder_flops(B, a.query_len, rl, h, inter)                # no-grad query embedding
    return 3 * fwd_grad + retrieval


def timed(timer: SegmentTimer, name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        with timer.segment(name):
            return fn(*args, **kwargs)
    return wrapper


def bench_batch(a: argparse.Namespace, model: REALM, engine: TorchEngine, index, B: int) -> dict:
    g = torch.Generator().manual_seed(B)
    Lr = min(a.query_len + a.doc_len - 1, a.reader_len)
    batch = synth_batch(B, a.k, a.query_len, a.masked, a.doc_len, Lr, g).to(a.device)
    # One excluded block per query (its source block), as trainer.data.exclusion_matrix gives.
    exclude = np.random.default_rng(B).integers(0, index.rows, (B, 1))
    timer = SegmentTimer(a.device)
    # Time REALM.forward's own parts by wrapping the instance's methods: the step stays the real one.
    model.relevance = timed(timer, "re-encode", REALM.relevance.__get__(model))
    autocast = torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=a.bf16)
    steps = []
    try:
        for i in range(a.warmup + a.steps):
            with timer.segment("retrieval"), torch.no_grad(), autocast:
                emb = model.retriever.embed_queries(batch.query_ids, batch.query_mask).float().cpu().numpy()
                index.search(emb, a.k, exclude)
            with timer.segment("forward"), autocast:
                out = model(batch)
            with timer.segment("bwd+opt"):
                engine.step(out["loss"])
            loss = out["loss"].detach()
            del out  # free the graph's activations before the next step's forward
            t = timer.collect()
            if not torch.isfinite(loss):  # checked after the step: a mid-step sync would distort the parts
                raise RuntimeError(f"non-finite loss {float(loss)} at batch size {B}")
            t["reader"] = t.pop("forward") - t["re-encode"]
            if i >= a.warmup:
                steps.append(t)
    finally:
        del model.relevance
    # Median step, and each part's median (parts need not add up exactly to the median step).
    total = float(np.median([sum(s[p] for p in PARTS) for s in steps]))
    part = {p: float(np.median([s[p] for s in steps])) for p in PARTS}
    share = sum(part.values())
    cfg = model.reader.bert.config
    tokens = B * (a.query_len + a.k * a.doc_len + a.k * Lr + a.query_len)
    flops = step_flops(a, B, Lr, cfg)
    row = {"batch": B, "step ms": 1e3 * total, "examples/s": B / total, "tokens/s": tokens / total,
           "TFLOP/s": flops / total / 1e12, "MFU(bf16 peak)": mfu(flops, total, peak_bf16_flops(a.device))}
    row.update({f"{p} %": 100 * part[p] / share for p in PARTS})
    row.update({f"{p} ms": 1e3 * part[p] for p in PARTS})
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    torch.manual_seed(0)
    make_bert = bert_factory(a.init, VOCAB, a.hidden, a.heads, a.intermediate)
    model = build_realm(make_bert, a.layers, a.reader_layers, a.dim)
    model.to(a.device).train()
    if a.bf16w:
        model.to(torch.bfloat16)
    if a.compile:  # in place, so parameter names (and the optimizer groups) stay the same
        for enc in (model.retriever.query_tower.encoder, model.retriever.doc_tower.encoder, model.reader.bert):
            enc.compile(dynamic=False)
    a.layers_real = model.retriever.query_tower.encoder.config.num_hidden_layers
    a.reader_layers_real = model.reader.bert.config.num_hidden_layers
    # The optimizer pretrain() builds: reader body + heads at their own rates, retriever at another.
    groups = param_groups(list(model.reader.named_parameters(prefix="reader")) + [("null_score", model.null_score)],
                          1e-5, 1e-4, FRESH_HEADS)
    groups.append({"params": list(model.retriever.parameters()), "lr": 1e-5})
    engine = TorchEngine(groups, total_steps=10_000, warmup_steps=100)

    emb = np.random.default_rng(0).standard_normal((a.index_rows, a.dim), dtype=np.float32)
    if a.index == "sharded":
        # faiss: imported here so the torch fallback works without it
        from indexer.shards import ShardedIndex
        index = ShardedIndex(emb, a.shards)
    else:
        index = TorchIndex(emb, a.device)
    del emb

    rows = []
    for B in a.batch_sizes:
        try:
            row = bench_batch(a, model, engine, index, B)
        except torch.cuda.OutOfMemoryError:
            row = {"batch": B, "step ms": "OOM"}
            engine.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  batch {B}: " + ", ".join(f"{k} {fmt(v)}" for k, v in row.items() if k != "batch"), flush=True)

    cfg = model.reader.bert.config
    Lr = min(a.query_len + a.doc_len - 1, a.reader_len)
    config = {"init": a.init, "retriever_layers": a.layers_real, "reader_layers": a.reader_layers_real,
              "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "intermediate": cfg.intermediate_size,
              "k": a.k, "Lq": a.query_len, "M": a.masked, "Ld": a.doc_len, "Lr": Lr,
              "index": a.index, "index_rows": a.index_rows,
              "shards": a.shards if a.index == "sharded" else "-",
              "precision": "bf16 weights" if a.bf16w else "bf16 autocast" if a.bf16 else "fp32",
              "compile": a.compile,
              "steps": a.steps, "warmup": a.warmup, "smoke": a.smoke}
    notes = ["tokens/step = B*(Lq query + K*Ld doc + K*Lr reader + Lq null-doc reader)",
             ("FLOPs = 3 x forward matmuls of query tower, doc tower, reader (+ null doc) and MLM head, "
              "+ 1 x the no-grad retrieval query embedding; MFU vs dense bf16 peak, n/a on CPU"),
             ("parts: medians over the timed steps; shares are of their sum. The batch is synthetic and already "
              "on the device (collation and host->device copies are not measured)")]
    title = f"REALM training step (k={a.k} + null)"
    print_table(title, rows)
    write_results(title, config, rows, a.results, a.device, notes)
    return rows


if __name__ == "__main__":
    main()
