"""The commands' bodies: prepare, ICT warm start, evaluation (pre-training: trainer/pretrain.py).

Each reads from and writes into `cfg.run_dir`, so `prepare -> ict -> pretrain -> evaluate`
chain with no other arguments:
    blocks/              block store (indexer.blocks)
    examples/            train.parquet, eval.parquet
    models/ict, models/realm   model checkpoints (trainer.checkpoint)
    index/               index versions (indexer.versions)
    events.jsonl, metrics.json
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from indexer.blocks import BlockStore, build_block_store
from indexer.embed import embed_blocks, encode_blocks
from indexer.io import InputError, atomic_write_json
from indexer.shards import ShardedIndex
from indexer.synthetic import write_synthetic
from indexer.tokenizer import Vocab, load_tokenizer
from indexer.versions import IndexVersions
from trainer import data as D
from trainer.checkpoint import fresh_model, load_model, save_model
from trainer.config import Config, to_dict
from trainer.engine import TorchEngine, param_groups
from trainer.metrics import MetricsLogger
from trainer.model import REALM, marginal_token_log_probs, pca_projection, spans_correct


def pick_device(cfg: Config) -> torch.device:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Run:
    """What every command after `prepare` opens: the run dir, block store and tokenizer."""
    cfg: Config
    dir: Path
    store: BlockStore
    tok: object
    vocab: Vocab
    device: torch.device

    @classmethod
    def open(cls, cfg: Config) -> Run:
        run_dir = Path(cfg.run_dir)
        store = BlockStore(run_dir / "blocks")
        tok = load_tokenizer(store.vocab_file)
        return cls(cfg, run_dir, store, tok, Vocab(tok), pick_device(cfg))

    @property
    def versions(self) -> IndexVersions:
        return IndexVersions(self.dir / "index")


# ---- prepare -----------------------------------------------------------------------------------


def prepare(cfg: Config) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    corpus, pretrain, evalf = cfg.data.corpus, cfg.data.pretrain, cfg.data.eval
    if not corpus:  # the embedded default: a generated synthetic-knowledge corpus
        paths = write_synthetic(run_dir / "data", cfg.data.synthetic_entities, cfg.seed,
                                cfg.data.synthetic_relations)
        corpus, pretrain, evalf = str(paths["corpus"]), str(paths["pretrain"]), str(paths["eval"])
    meta = build_block_store(corpus, run_dir / "blocks", cfg.blocks.tokenizer, cfg.blocks.max_len,
                             cfg.blocks.max_title_len, cfg.data.max_doc_bytes)
    store = BlockStore(run_dir / "blocks")
    if pretrain:
        train = D.read_text_examples(pretrain, store)
    else:
        train = D.corpus_sentence_examples(store, cfg.masking.min_sentence_chars)
    eval_ex = D.read_text_examples(evalf, store) if evalf else None
    if cfg.masking.mode == "salient":
        train = D.attach_salient_spans(train, cfg.masking.ner)
        eval_ex = D.attach_salient_spans(eval_ex, cfg.masking.ner) if eval_ex is not None else None
    if eval_ex is None:
        train, eval_ex = D.split_train_eval(train, cfg.data.eval_fraction, cfg.data.max_eval_examples, cfg.seed)
    if not train:
        raise InputError(f"{pretrain or corpus}: no pre-training examples (no maskable spans found)")
    D.write_examples(run_dir / "examples", {"train": train, "eval": eval_ex})
    atomic_write_json(run_dir / "config.json", to_dict(cfg))
    summary = {**meta, "train_examples": len(train), "eval_examples": len(eval_ex)}
    print(json.dumps(summary))
    return summary


# ---- index -------------------------------------------------------------------------------------


def refresh_index(run: Run, model, step: int, doc_encoder_id: str, shards: int = 1) -> ShardedIndex:
    """Stop-the-world refresh: embed every block with the current doc encoder, publish, load."""
    emb = embed_blocks(model.retriever.doc_tower, run.store, batch_size=64, device=run.device,
                       pad_id=run.vocab.pad, progress=sys.stderr.isatty())
    v = run.versions.publish(emb, checkpoint_step=step, extra={"doc_encoder_id": doc_encoder_id})
    run.versions.gc(run.cfg.refresh.keep_versions)
    return ShardedIndex(emb, shards, v.version, step)


def stored_index(run: Run, *doc_encoder_ids: str) -> ShardedIndex | None:
    """A committed index version built by one of these doc encoders (in that order of preference)."""
    for doc_encoder_id in filter(None, doc_encoder_ids):
        v = run.versions.find(doc_encoder_id=doc_encoder_id)
        if v is not None and v.rows == len(run.store):
            return ShardedIndex(IndexVersions.load_rows(v), 1, v.version, v.checkpoint_step)
    return None


def index_for_model(run: Run, model, meta: dict) -> ShardedIndex:
    """The stored index this model's doc encoder built, else a fresh one (published)."""
    doc_encoder_id = meta.get("doc_encoder_id", "")
    return stored_index(run, doc_encoder_id) or refresh_index(run, model, meta.get("step", 0), doc_encoder_id)


def check_k(k: int, store: BlockStore, key: str) -> None:
    if k > len(store):
        raise InputError(f"config key '{key}': k={k} is larger than the corpus ({len(store)} blocks)")


# ---- the projection's initialization --------------------------------------------------------------


@torch.no_grad()
def pooled_sample(run: Run, tower, n: int, batch_size: int = 16) -> torch.Tensor:
    """The tower's pooled (pre-projection) outputs for `n` blocks drawn at random: [n, hidden] float32."""
    rng = np.random.default_rng(run.cfg.seed)
    ids = rng.choice(len(run.store), size=min(n, len(run.store)), replace=False)
    was_training = tower.training
    tower.eval()
    out = encode_blocks(tower.pooled, run.store, ids, batch_size, run.device, run.vocab.pad)
    tower.train(was_training)
    return torch.from_numpy(out)


def init_projection(run: Run, model: REALM) -> None:
    """`model.proj_init=pca`: both towers' projections from the corpus (pca_projection), so that the
    retriever starts as the init's own embeddings compared by cosine instead of through a random map."""
    m = run.cfg.model
    if m.proj_init != "pca":
        return
    t0 = time.time()
    pooled = pooled_sample(run, model.retriever.doc_tower, m.proj_init_blocks)
    weight = pca_projection(pooled, m.retrieval_dim, m.proj_init_scale ** 0.5)
    model.retriever.set_projection(weight.to(run.device))
    x = F.normalize(pooled.double(), dim=-1)
    kept = float((x @ weight.double().T).square().sum() / (m.proj_init_scale * len(x)))
    print(f"projection: PCA of {len(pooled)} blocks keeps {kept:.1%} of the normalized vectors' energy in "
          f"{m.retrieval_dim} dims ({time.time() - t0:.0f} s)", flush=True)


# ---- ICT ---------------------------------------------------------------------------------------


def ict(cfg: Config) -> dict:
    """Inverse Cloze Task: a sentence retrieves its own block among in-batch negatives."""
    run = Run.open(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = fresh_model(cfg, run.vocab.size).to(run.device)
    init_projection(run, model)
    retriever = model.retriever
    c = cfg.ict
    engine = TorchEngine(param_groups(list(retriever.named_parameters()), c.lr, c.lr * 20,
                                      ("query_tower.proj", "doc_tower.proj")), c.steps, c.warmup_steps)
    log = MetricsLogger(run.dir, "ict", cfg)
    retriever.train()
    t0 = time.time()
    for step in range(1, c.steps + 1):
        q_ids, q_mask, c_ids, c_mask = (t.to(run.device) for t in D.ict_batch(
            run.store, run.tok, run.vocab, c.batch_size, rng, c.keep_sentence_prob, c.max_query_len,
            cfg.masking.min_sentence_chars))
        scores = retriever.embed_queries(q_ids, q_mask) @ retriever.embed_docs(c_ids, c_mask).T
        labels = torch.arange(len(scores), device=scores.device)
        loss = F.cross_entropy(scores.float(), labels)
        norm = engine.step(loss)
        if step % cfg.pretrain.log_every == 0 or step == c.steps:
            acc = float((scores.argmax(-1) == labels).float().mean())
            log.log(step, loss=loss.item(), in_batch_accuracy=acc, grad_norm=norm, elapsed=time.time() - t0)
            print(f"ict step {step}/{c.steps} loss {loss.item():.3f} in-batch acc {acc:.2f}", flush=True)
    doc_encoder_id = uuid.uuid4().hex
    save_model(model, run.dir / "models" / "ict", step=0, extra={"doc_encoder_id": doc_encoder_id, "stage": "ict"})
    refresh_index(run, model, 0, doc_encoder_id)
    log.close()
    return {"steps": c.steps, "seconds": time.time() - t0}


# ---- REALM pre-training ------------------------------------------------------------------------


def sample_queries(examples: list, run: Run, n: int, rng: np.random.Generator) -> list[D.MaskedQuery]:
    out = []
    while len(out) < n:
        q = D.mask_example(examples[int(rng.integers(len(examples)))], run.tok, run.vocab,
                           run.cfg.model.query_max_len, rng, run.cfg.masking.mode, run.cfg.masking.random_span_max)
        if q is not None:
            out.append(q)
    return out


@torch.no_grad()
def retrieve(model: REALM, index: ShardedIndex, run: Run, queries: list[D.MaskedQuery], k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidates for masked queries from the (possibly stale) index, exclusions applied."""
    ids, mask = D.pad_batch([q.ids for q in queries], run.vocab.pad)
    emb = model.retriever.embed_queries(ids.to(run.device), mask.to(run.device)).float().cpu().numpy()
    return index.search(emb, k, D.exclusion_matrix(queries))


def initial_model(run: Run) -> tuple[REALM, dict]:
    """The ICT model (its metadata: stage, doc_encoder_id), else a fresh one from model.init."""
    ict_dir = run.dir / "models" / "ict"
    if ict_dir.is_dir():
        model, meta = load_model(ict_dir)
        model.reader.use_head(run.cfg.model.reader_head)  # the reader's head is pre-training's, not ICT's
        return model.to(run.device), meta
    print("warning: no ICT checkpoint in the run directory; starting from model.init without a warm "
          "retriever (REALM may get no retrieval signal: run `launch.py ict` first)", file=sys.stderr)
    model = fresh_model(run.cfg, run.vocab.size).to(run.device)
    init_projection(run, model)
    return model, {"stage": run.cfg.model.init}


# ---- evaluation --------------------------------------------------------------------------------


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


@torch.no_grad()
def evaluate(cfg: Config) -> dict:
    """Masked-span accuracy with and without retrieval, and retrieval recall@k, on held-out examples."""
    run = Run.open(cfg)
    k = cfg.eval.k
    check_k(k, run.store, "eval.k")
    model_dir = resolve_model_dir(run.dir, cfg.eval.model)
    model, meta = load_model(model_dir)
    model.to(run.device).eval()
    index = index_for_model(run, model, meta)
    examples = D.read_examples(run.dir / "examples" / "eval.parquet")[:cfg.data.max_eval_examples]
    rng = np.random.default_rng(12345)  # the same masked span every evaluation
    queries = [q for ex in examples if (q := D.mask_example(ex, run.tok, run.vocab, cfg.model.query_max_len, rng,
                                                              cfg.masking.mode, cfg.masking.random_span_max))]
    if not queries:
        raise InputError(f"{run.dir}/examples/eval.parquet: no evaluable examples")
    correct = correct_null = recall_hits = recall_n = 0
    for i in range(0, len(queries), cfg.eval.batch_size):
        qs = queries[i:i + cfg.eval.batch_size]
        _, cand = retrieve(model, index, run, qs, k)
        batch = D.collate_realm(qs, cand, run.store, run.vocab, cfg.model.reader_max_len).to(run.device)
        token_lp = model.token_log_probs(batch)                              # [B, Z, M, V]
        marginal = marginal_token_log_probs(model.relevance(batch), token_lp)
        correct += int(spans_correct(marginal, batch.targets, batch.target_mask).sum())
        correct_null += int(spans_correct(token_lp[:, 0], batch.targets, batch.target_mask).sum())
        hits = D.gold_hits(qs, cand)
        recall_n, recall_hits = recall_n + len(hits), recall_hits + sum(hits)
    n = len(queries)
    metrics = {"mlm_accuracy": correct / n, "mlm_accuracy_no_retrieval": correct_null / n,
               "retrieval_recall_at_k": recall_hits / recall_n if recall_n else None,
               "k": k, "n": n, "n_with_gold": recall_n, "model": str(model_dir), "model_step": meta.get("step"),
               "index_version": index.version}
    atomic_write_json(run.dir / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return metrics
