"""The whole system's config: the training schema plus the cluster section, and the loader
`launch.py` (and anything that starts the system) calls."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

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
class Config(TrainConfig):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def valid_keys() -> list[str]:
    return _valid_keys(Config)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """YAML at `path` (optional), then `dotted.key=value` overrides, validated and checked."""
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
    if cfg.pretrain.batch_size % cc.trainers:
        raise InputError(f"config key 'pretrain.batch_size': {cfg.pretrain.batch_size} does not split evenly "
                         f"over cluster.trainers={cc.trainers}")
