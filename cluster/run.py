"""Start (or join) Ray, place the actors, run pre-training, tear down.

`launch.py pretrain` with `cluster.backend=ray` lands here: on one node it starts a local Ray
(bound to `cluster.host`, 127.0.0.1 by default; dashboard off unless `cluster.dashboard=true`);
under `ray job submit` it joins the cluster (`cluster.address=auto`). Trainers are gang-scheduled
in a placement group (all ranks start or none: a half-placed DeepSpeed group would hang in its
rendezvous); embedding workers and shard servers are ordinary actors that Ray restarts if they die.
"""
from __future__ import annotations

import ipaddress
import math
import os
import time
import uuid
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import EmbeddingWorker, ShardServer, ShardService, TrainerWorker
from cluster.config import Config
from cluster.refresh import RefreshCoordinator
from core.env import OFFLINE_ENV
from core.errors import InputError
from core.files import atomic_write_json
from indexer.corpus_versions import read_pointer
from indexer.versions import IndexVersions

RELEASE_TIMEOUT_S = 60.0     # an earlier launch's actors still being torn down
PLACEMENT_TIMEOUT_S = 600.0  # all trainer ranks placed, or none


def actor_env(cfg: Config, gpus: float) -> dict:
    """Environment for an actor's process: offline hub, and DeepSpeed's CPU accelerator off-GPU."""
    env = dict(OFFLINE_ENV)
    if gpus == 0 or cfg.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return {"env_vars": env}


def connect(cfg: Config, cpus: float | None = None, gpus: float | None = None) -> bool:
    """Join `cluster.address`, or start a local Ray sized for the actors (pre-training's, unless `cpus` and
    `gpus` say what another command needs); True if we started it."""
    cc = cfg.cluster
    if ray.is_initialized():
        return False
    if cc.address:
        ray.init(address=cc.address, log_to_driver=True)
        return False
    if cpus is None:
        cpus = cc.trainers * cc.trainer_cpus + cc.embedding_workers * cc.embed_cpus + cc.shards * cc.shard_cpus
        gpus = cc.trainers * cc.trainer_gpus + cc.embedding_workers * cc.embed_gpus + cc.shards * cc.shard_gpus
    # Logical CPUs: on a small machine the actors share cores (they are not all busy at once).
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)), num_gpus=math.ceil(gpus or 0) or None,
             include_dashboard=cc.dashboard, dashboard_host=cc.host, _node_ip_address=cc.host,
             log_to_driver=True, configure_logging=False)
    return True


def rendezvous(cfg: Config, endpoint: tuple[str, int]) -> tuple[str, int, str | None]:
    """Where the trainers meet for torch.distributed: (rank 0's address, port, store file).

    On a loopback-only cluster (the local one) the ranks share the run directory's filesystem, so
    they meet through a file store: torch's TCPStore would listen on every interface whatever
    address it is given. Across machines, rank 0's TCP address and port."""
    host, port = endpoint
    if ipaddress.ip_address(host).is_loopback:
        return host, port, str(Path(cfg.run_dir).resolve() / f".rendezvous-{uuid.uuid4().hex}")
    return host, port, None


def actor_name(role: str, cfg: Config) -> str:
    """Named per run directory, so tools (and fault-injection tests) can find a run's actors."""
    return f"realm-{role}:{Path(cfg.run_dir).resolve()}"


def release_names(cfg: Config) -> None:
    """Kill actors a previous launch on this run dir left behind (e.g. a killed trainer still being
    torn down), so that this launch can take their names."""
    suffix = f":{Path(cfg.run_dir).resolve()}"
    deadline = time.time() + RELEASE_TIMEOUT_S
    while stale := [n for n in ray.util.list_named_actors() if n.startswith("realm-") and n.endswith(suffix)]:
        for name in stale:
            try:
                ray.kill(ray.get_actor(name))
            except ValueError:  # gone meanwhile
                pass
        if time.time() > deadline:
            raise RuntimeError(f"actors {stale} of an earlier launch on {cfg.run_dir} did not go away")
        time.sleep(0.2)


def start_index_actors(cfg: Config) -> tuple[list, object, list, object]:
    """Shard servers, the shard service, embedding workers and the refresh coordinator."""
    cc, run_dir = cfg.cluster, str(Path(cfg.run_dir).resolve())
    shards = [ShardServer.options(num_cpus=cc.shard_cpus, num_gpus=cc.shard_gpus, max_concurrency=4,
                                  max_restarts=-1, runtime_env=actor_env(cfg, cc.shard_gpus))
              .remote(f"{run_dir}/index", i, cc.shards, cc.shard_gpus > 0)
              for i in range(cc.shards)]
    service = ShardService.options(num_cpus=0, max_concurrency=64, name=actor_name("shards", cfg)).remote(shards)
    device = "cuda" if cc.embed_gpus > 0 else "cpu"
    workers = [EmbeddingWorker.options(num_cpus=cc.embed_cpus, num_gpus=cc.embed_gpus, max_restarts=-1,
                                       runtime_env=actor_env(cfg, cc.embed_gpus))
               .remote(run_dir, cc.embed_threads, cc.embed_batch_size, device)
               for _ in range(cc.embedding_workers)]
    coordinator = RefreshCoordinator.options(num_cpus=0, max_concurrency=8, name=actor_name("refresh", cfg)).remote(
        run_dir, workers, service, cc.slices or cc.embedding_workers, cfg.refresh.keep_versions, cc.poll_seconds)
    return shards, service, workers, coordinator


def start_trainers(cfg: Config) -> tuple[list, object]:
    cc = cfg.cluster
    bundle = {"CPU": cc.trainer_cpus, **({"GPU": cc.trainer_gpus} if cc.trainer_gpus else {})}
    pg = placement_group([bundle] * cc.trainers, strategy="PACK")
    if not pg.wait(PLACEMENT_TIMEOUT_S):
        remove_placement_group(pg)
        raise InputError(f"config keys 'cluster.trainers'/'cluster.trainer_*': {cc.trainers} x {bundle} "
                         f"could not be placed on this Ray cluster within {PLACEMENT_TIMEOUT_S:.0f} s")
    trainers = [TrainerWorker.options(num_cpus=cc.trainer_cpus, num_gpus=cc.trainer_gpus,
                                      runtime_env=actor_env(cfg, cc.trainer_gpus), name=actor_name(f"trainer-{i}", cfg),
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i))
                .remote(cfg, i, cc.trainers) for i in range(cc.trainers)]
    return trainers, pg


def pretrain_on_ray(cfg: Config) -> dict:
    if not (Path(cfg.run_dir) / "blocks" / "manifest.json").is_file():
        raise InputError(f"{cfg.run_dir}/blocks: no block store (run `launch.py prepare` first)")
    IndexVersions(Path(cfg.run_dir) / "index").current()  # a damaged CURRENT fails here, in one line
    if read_pointer(cfg.run_dir) is not None:
        # the embedding workers and shard servers read blocks/ and index/CURRENT, not an edited store's pair
        raise InputError(f"{cfg.run_dir}/CORPUS: the corpus was edited (update-corpus or reindex); pre-training on "
                         f"Ray reads only the store prepare wrote: use cluster.backend=local, or prepare again")
    started = connect(cfg)
    release_names(cfg)
    t0 = time.time()
    shards, service, workers, coordinator = start_index_actors(cfg)
    pg, trainers, master = None, [], None
    try:
        ray.get(coordinator.start.remote())
        refresher = coordinator.run.remote()
        trainers, pg = start_trainers(cfg)
        master = rendezvous(cfg, ray.get(trainers[0].endpoint.remote()))
        summaries = ray.get([t.train.remote(master, service) for t in trainers])
        history = ray.get(coordinator.stop.remote())
        ray.get(refresher)
        recoveries = ray.get(service.recovery_log.remote())
    finally:
        for actor in [coordinator, service, *workers, *shards, *trainers]:
            ray.kill(actor)
        if pg is not None:
            remove_placement_group(pg)
        if master and master[2]:
            Path(master[2]).unlink(missing_ok=True)
        if started:
            ray.shutdown()
    summary = {**summaries[0], "refreshes": len(history), "refresh_history": history, "shard_recoveries": recoveries,
               "refresh_mode": cfg.refresh.mode, "wall_seconds": time.time() - t0,
               "trainers": cfg.cluster.trainers, "embedding_workers": cfg.cluster.embedding_workers,
               "shards": cfg.cluster.shards}
    atomic_write_json(Path(cfg.run_dir) / "pretrain_summary.json", summary)
    return summary
