"""The whole system's config: the training schema plus the cluster section, and the loader
`launch.py` (and anything that starts the system) calls."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import yaml

from core.errors import InputError
from core.schema import check_choices, check_positive, load_tree
from core.schema import valid_keys as _valid_keys
from trainer.config import TrainConfig, check_train_config


@dataclass
class ClusterConfig:
    backend: str = "local"         # local: one process, stop-the-world refresh | ray: the actors below
    address: str = ""              # "" = start a local Ray on this machine | "auto" = the cluster we run in
    host: str = "127.0.0.1"        # local Ray's node address; its dashboard binds here too
    dashboard: bool = False
    trainers: int = 1              # data-parallel DeepSpeed ranks
    trainer_cpus: float = 1
    trainer_gpus: float = 0
    embedding_workers: int = 2
    embed_cpus: float = 1
    embed_gpus: float = 0
    embed_threads: int = 1         # torch threads per embedding worker (CPU)
    embed_batch_size: int = 64
    slices: int = 0                # slices per refresh (0 = one per embedding worker)
    shards: int = 2
    shard_cpus: float = 0.5
    shard_gpus: float = 0
    zero_stage: int = 0            # DeepSpeed ZeRO stage 0-2
    bf16: str = "auto"             # auto (on GPU) | true | false
    dist_backend: str = "auto"     # auto: nccl on GPU, gloo on CPU
    poll_seconds: float = 0.5      # the refresh coordinator's look for newly published doc encoders


@dataclass
class ServeConfig:
    """`launch.py serve`: the Open-QA HTTP service (cluster/serve.py)."""
    host: str = "127.0.0.1"        # the HTTP proxy binds here only; 0.0.0.0 exposes the service to the network
    port: int = 8000
    replicas: int = 1              # QA replicas (each loads the model and the index)
    replica_cpus: float = 1
    replica_gpus: float = 0
    max_batch_size: int = 16       # concurrent questions answered as one batch
    batch_wait_s: float = 0.0      # how long a lone request waits for company: a batch is what queued while the
                                   # model was busy, so under load it fills anyway; waiting only delays batch 1
    max_k: int = 32                # the largest k a request may ask for (and at most the live blocks)
    poll_seconds: float = 1.0      # how often a replica looks for a newly committed corpus version or model
    unavailable_s: float = 60.0    # how long a request waits for a reader replica (one restarting after a crash
                                   # loads the model again) before the client gets 503


@dataclass
class Config(TrainConfig):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def valid_keys() -> list[str]:
    return _valid_keys(Config)


# The keys each `launch.py` command reads: dotted keys, or a section ("ict." = all of ict). The config file
# describes the whole run, so it may set any key; a command-line override is for the one command it is given
# to, and one that command does not read is refused, naming the commands that do (a user who passes
# `evaluate data.eval=FILE` must get FILE scored or told, never a silent score of something else).
# tests/test_command_keys.py records what each command really reads and checks it against this table.
_COMPUTE = ("run_dir", "device", "threads")
_MODEL_SHAPE = ("model.init", "model.retriever_layers", "model.reader_layers", "model.hidden_size",
                "model.num_heads", "model.intermediate_size", "model.retrieval_dim", "model.pooling",
                "model.reader_head", "model.copy_layer", "model.copy_init", "model.proj_init", "model.proj_init_blocks",
                "model.proj_init_scale")
_LENGTHS = ("model.query_max_len", "model.reader_max_len")
_RETRIEVAL_MODE = ("retrieval.mode", "retrieval.fusion", "retrieval.bm25_weight", "retrieval.fusion_depth",
                   "retrieval.rrf_k", "index.")
_QA_READING = ("eval.model", "finetune.k", "finetune.max_answer_len", "finetune.retrieval", *_RETRIEVAL_MODE,
               *_LENGTHS)
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "prepare": ("run_dir", "seed", "data.corpus", "data.synthetic_entities", "data.synthetic_relations",
                "data.synthetic_phrasing", "data.pretrain", "data.eval", "data.eval_fraction", "data.eval_split",
                "data.max_eval_examples",
                "data.max_doc_bytes",
                "blocks.", "masking.mode", "masking.ner", "masking.min_sentence_chars", "prepare.",
                "cluster.address", "cluster.host", "cluster.dashboard"),  # prepare.engine=ray
    "ict": (*_COMPUTE, "seed", *_MODEL_SHAPE, "ict.", "refresh.keep_versions", "wandb."),
    # pretrain builds a fresh model (model.*) when there is no ICT model to start from
    "pretrain": (*_COMPUTE, "seed", "model.", "masking.mode", "masking.random_span_max", "retrieval.k",
                 "pretrain.", "refresh.", "wandb.", "cluster."),
    "finetune": (*_COMPUTE, "seed", "data.corpus", "data.qa_train", "finetune.", *_RETRIEVAL_MODE, *_LENGTHS,
                 "refresh.keep_versions", "wandb."),
    "evaluate": (*_COMPUTE, "task", "eval.", "data.eval", "data.max_eval_examples", "data.corpus", "data.qa_eval",
                 "masking.mode", "masking.ner", "masking.random_span_max", *_QA_READING),
    "query": (*_COMPUTE, "question", *_QA_READING),
    "explain": (*_COMPUTE, "question", "text", "answer", "eval.k", *_QA_READING),
    "report": ("run_dir",),
    # blocks.max_title_len only for a store written before stores recorded it; refresh.keep_versions: index gc
    "update-corpus": (*_COMPUTE, "changes", "eval.model", "data.max_doc_bytes", "blocks.max_title_len",
                      "refresh.keep_versions"),
    "reindex": (*_COMPUTE, "data.corpus", "eval.model", "data.max_doc_bytes", "blocks.max_title_len",
                "refresh.keep_versions"),
    # serving answers as `query` does; it starts (or joins, cluster.address) Ray itself
    "serve": (*_COMPUTE, *_QA_READING, "serve.", "cluster.address", "cluster.host", "cluster.dashboard"),
}


def reads(command: str, key: str) -> bool:
    return any(key.startswith(k) if k.endswith(".") else key == k for k in COMMAND_KEYS[command])


def readers(key: str) -> list[str]:
    return [c for c in COMMAND_KEYS if reads(c, key)]


def override_keys(item: str) -> list[str]:
    """The leaf keys an override sets ("ict.lr=1e-4" -> ict.lr; "ict={lr: 1e-4, steps: 5}" -> both)."""
    key, _, value = item.partition("=")
    key = key.strip()
    if key in valid_keys():
        return [key]
    try:
        mapping = yaml.safe_load(value)
    except yaml.YAMLError:
        mapping = None
    if isinstance(mapping, dict):
        return [k for sub, v in mapping.items() for k in override_keys(f"{key}.{sub}={json.dumps(v)}")]
    return [key]  # unknown: load_tree names it with the valid keys


def overrides_for(command: str, overrides: list[str], pipeline: tuple[str, ...] = ()) -> list[str]:
    """The overrides `command` reads. Any other is refused, naming the commands that read it, unless it is
    read by another command of `pipeline` (a script passing one set of overrides to all its stages), in
    which case this command skips it."""
    kept = []
    for item in overrides:
        keys = [k for k in override_keys(item) if k in valid_keys()]
        unread = [k for k in keys if not reads(command, k)]
        if not unread:
            kept.append(item)
            continue
        for k in unread:
            if not any(reads(c, k) for c in pipeline):
                who = ", ".join(readers(k)) or "no command"
                where = f"any of {', '.join(pipeline)}" if pipeline else f"'{command}'"
                raise InputError(f"config key '{k}' is not read by {where}; it is read by: {who}")
        if len(unread) < len(keys):
            raise InputError(f"override '{item.partition('=')[0]}': sets keys of several commands; "
                             f"give {', '.join(unread)} on its own")
    return kept


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), command: str | None = None,
                pipeline: tuple[str, ...] = ()) -> Config:
    """YAML at `path` (optional), then `dotted.key=value` overrides, validated and checked. With `command`,
    an override that command does not read is refused (see COMMAND_KEYS and overrides_for)."""
    if command is not None:
        load_tree(Config, None, overrides)  # unknown keys first, with the list of valid ones
        overrides = overrides_for(command, list(overrides), pipeline)
    cfg = load_tree(Config, path, overrides)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    check_train_config(cfg)
    cc = cfg.cluster
    check_positive({"cluster.trainers": cc.trainers, "cluster.embedding_workers": cc.embedding_workers,
                    "cluster.shards": cc.shards, "cluster.embed_batch_size": cc.embed_batch_size})
    check_choices({"cluster.backend": (cc.backend, ("local", "ray")),
                   "cluster.bf16": (cc.bf16, ("auto", "true", "false")),
                   "cluster.dist_backend": (cc.dist_backend, ("auto", "gloo", "nccl")),
                   "cluster.zero_stage": (cc.zero_stage, (0, 1, 2))})
    sc = cfg.serve
    check_positive({"serve.replicas": sc.replicas, "serve.max_batch_size": sc.max_batch_size,
                    "serve.max_k": sc.max_k, "serve.poll_seconds": sc.poll_seconds})
    if not 1 <= sc.port <= 65535:
        raise InputError(f"config key 'serve.port': must be a TCP port (1-65535), got {sc.port}")
    for key in ("batch_wait_s", "replica_cpus", "replica_gpus", "unavailable_s"):
        if getattr(sc, key) < 0:
            raise InputError(f"config key 'serve.{key}': must not be negative, got {getattr(sc, key)}")
    if cfg.pretrain.batch_size % cc.trainers:
        raise InputError(f"config key 'pretrain.batch_size': {cfg.pretrain.batch_size} does not split evenly "
                         f"over cluster.trainers={cc.trainers}")
