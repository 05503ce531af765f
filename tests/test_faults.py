"""Fault injection on a real local Ray cluster: kill an embedding worker in the middle of a refresh
and a shard server in the middle of training (SIGKILL by PID) while DeepSpeed trains on."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from cluster.run import actor_name, pretrain_on_ray
from indexer.versions import IndexVersions
from tests.conftest import pretrain_losses
from trainer.ict import ict
from trainer.prepare import prepare

pytestmark = pytest.mark.timeout(900)



def actor(role: str, cfg, timeout: float = 120.0):
    deadline = time.time() + timeout
    while True:
        try:
            return ray.get_actor(actor_name(role, cfg))
        except ValueError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def run_in_thread(cfg) -> tuple[threading.Thread, dict]:
    out = {}

    def target():
        try:
            out["summary"] = pretrain_on_ray(cfg)
        except BaseException as e:  # re-raised by the test
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, out


def check_run(cfg, out: dict) -> list[dict]:
    if "error" in out:
        raise out["error"]
    events = [json.loads(line) for line in open(Path(cfg.run_dir) / "events.jsonl")]
    steps = [e["step"] for e in events if e["job"] == "pretrain"]
    assert steps == list(range(1, cfg.pretrain.steps + 1)), "steps lost"
    assert max(e["staleness"] for e in events if e["job"] == "pretrain") <= cfg.refresh.max_staleness
    versions = IndexVersions(Path(cfg.run_dir) / "index")
    for v in versions.versions():  # every committed version complete and intact
        IndexVersions.load_rows(versions.open(versions.root / f"v{v:04d}", verify=True))
    return events


def test_killing_an_embedding_worker_mid_refresh_loses_nothing(local_ray, tiny_cfg):
    cfg = tiny_cfg("ict.steps=1", "data.pretrain=", "data.eval=", "masking.ner=regex",
                   "pretrain.steps=16", "pretrain.log_every=1", "refresh.every_steps=4", "refresh.max_staleness=8",
                   "cluster.backend=ray", "cluster.embedding_workers=2", "cluster.slices=12",
                   "cluster.embed_batch_size=1", "cluster.poll_seconds=0.05", "pretrain.checkpoint_every=1000",
                   "threads=1")
    prepare(cfg)
    ict(cfg)
    thread, out = run_in_thread(cfg)
    coordinator = actor("refresh", cfg)
    index_root = Path(cfg.run_dir) / "index"
    killed = []
    while thread.is_alive() and not killed:
        # a refresh is under way once a staging dir holds its first slice: kill worker 0 then
        staging = [p for p in index_root.glob(".staging-v*") if any(p.glob("slice_*.npy"))]
        if staging:
            pid = ray.get(coordinator.worker_pids.remote())[0]
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, time.perf_counter()))
        time.sleep(0.002)
    thread.join()
    check_run(cfg, out)
    history = out["summary"]["refresh_history"]
    assert killed, "the run ended before a refresh could be interrupted"
    moved = [r for r in history if r["slices_reassigned"]]
    assert moved, f"no slice was reassigned: {history}"
    normal = [r["swap_seconds"] for r in history if not r["slices_reassigned"]]
    print(f"embedding worker killed: {len(killed)}; refreshes {len(history)}, with reassigned slices "
          f"{len(moved)} ({moved[0]['swap_seconds']:.2f} s vs {sum(normal) / max(1, len(normal)):.2f} s mean "
          f"otherwise); steps lost 0")


def test_killing_a_shard_server_mid_training_recovers(local_ray, tiny_cfg):
    cfg = tiny_cfg("ict.steps=1", "pretrain.steps=16", "pretrain.log_every=1", "refresh.every_steps=4",
                   "refresh.max_staleness=8", "cluster.backend=ray", "cluster.shards=2",
                   "pretrain.checkpoint_every=1000", "threads=1")
    prepare(cfg)
    ict(cfg)
    thread, out = run_in_thread(cfg)
    service = actor("shards", cfg)
    events_path = Path(cfg.run_dir) / "events.jsonl"
    while thread.is_alive():  # wait for training to be under way
        if events_path.is_file() and '"job": "pretrain"' in events_path.read_text():
            break
        time.sleep(0.05)
    pid = ray.get(service.shard_pids.remote())[1]
    os.kill(pid, signal.SIGKILL)
    thread.join()
    check_run(cfg, out)
    recoveries = out["summary"]["shard_recoveries"]
    assert recoveries and recoveries[0]["shards"] == [1], recoveries
    print(f"shard server killed: 1; queries that waited for it: {len(recoveries)}, "
          f"recovery {recoveries[0]['seconds']:.2f} s; steps lost 0")



def test_killed_deepspeed_trainer_resumes_with_the_same_pretrain_losses(local_ray, tiny_cfg, tmp_path):
    """refresh.mode=sync makes the index a function of the step, so the resumed run must retrace
    the uninterrupted one exactly (CPU, fp32, same seed): losses compared bit for bit."""
    import copy
    import shutil

    base = tiny_cfg("ict.steps=1", "pretrain.steps=10", "pretrain.log_every=1", "refresh.every_steps=2",
                    "refresh.mode=sync", "pretrain.checkpoint_every=2", "cluster.backend=ray", "threads=1")
    prepare(base)
    ict(base)
    runs = {}
    for name in ("a", "b"):
        runs[name] = copy.deepcopy(base)
        runs[name].run_dir = str(tmp_path / name)
        shutil.copytree(base.run_dir, runs[name].run_dir)
    pretrain_on_ray(runs["a"])
    want = pretrain_losses(Path(runs["a"].run_dir))

    b = runs["b"]
    thread, out = run_in_thread(b)
    trainer = actor("trainer-0", b)
    pid = ray.get(trainer.pid.remote())
    checkpoints = Path(b.run_dir) / "checkpoints"
    while thread.is_alive() and not (checkpoints / "step_4").is_dir():
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    thread.join()
    assert isinstance(out.get("error"), ray.exceptions.RayError), out
    assert not (Path(b.run_dir) / "models" / "realm").exists(), "finished before the kill"
    versions_before = IndexVersions(Path(b.run_dir) / "index").versions()

    resumed = copy.deepcopy(b)
    resumed.pretrain.resume = True
    summary = pretrain_on_ray(resumed)
    start = summary["start_step"]
    assert 4 <= start < 10
    got = pretrain_losses(Path(b.run_dir))
    assert [got[s] for s in range(start + 1, 11)] == [want[s] for s in range(start + 1, 11)]
    assert min(IndexVersions(Path(b.run_dir) / "index").versions()) >= min(versions_before)
    assert max(IndexVersions(Path(b.run_dir) / "index").versions()) > max(versions_before)
    print(f"trainer killed at step >= 4, resumed from step {start}: losses of steps {start + 1}-10 equal "
          f"bit for bit; index versions {versions_before} -> {IndexVersions(Path(b.run_dir) / 'index').versions()}")
