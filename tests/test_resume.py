"""Kill the trainer process mid-run, then resume: nothing half-written is ever taken for complete,
and the resumed run's losses equal an uninterrupted run's (same seed, CPU)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.env import OFFLINE_ENV
from core.files import verify_manifest
from indexer.versions import IndexVersions
from tests.conftest import ROOT, pretrain_losses
from trainer.checkpoint import latest_training_state, step_dirs
from trainer.ict import ict
from trainer.prepare import prepare

STEPS = ["pretrain.steps=14", "pretrain.checkpoint_every=2", "refresh.every_steps=2", "pretrain.log_every=1",
         "cluster.backend=local", "refresh.mode=sync"]


def cli_args(cfg, *extra) -> list[str]:
    c = cfg
    return [sys.executable, str(ROOT / "launch.py"), "pretrain", f"run_dir={c.run_dir}",
            "model.init=random", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
            "model.retriever_layers=1", "model.reader_layers=1", "model.query_max_len=32", "model.reader_max_len=96",
            "threads=1", "retrieval.k=3", "pretrain.batch_size=4", *STEPS, *extra]



def assert_nothing_half_written_is_visible(run_dir: Path) -> None:
    """Every finished-looking checkpoint and index version verifies; temp dirs are never listed."""
    for _, path in step_dirs(run_dir / "checkpoints"):
        verify_manifest(path)  # every file present, sizes and sha256 as written
    assert latest_training_state(run_dir / "checkpoints") is not None
    versions = IndexVersions(run_dir / "index")
    for v in versions.versions():
        IndexVersions.load_rows(versions.open(versions.root / f"v{v:04d}", verify=True))
    assert versions.current() is not None


def test_kill_then_resume_matches_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("ict.steps=2", "threads=1")
    prepare(cfg)
    ict(cfg)
    base = Path(cfg.run_dir)
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(base, a)
    shutil.copytree(base, b)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(ROOT)}

    subprocess.run(cli_args(cfg, f"run_dir={a}"), check=True, env=env, capture_output=True, timeout=600)
    want = pretrain_losses(a)
    assert sorted(want) == list(range(1, 15))

    # run b: killed (SIGKILL, no clean-up) soon after its second checkpoint appears
    proc = subprocess.Popen(cli_args(cfg, f"run_dir={b}"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(step_dirs(b / "checkpoints")) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "models" / "realm").exists(), "the run finished before it could be killed"
    assert_nothing_half_written_is_visible(b)
    resumed_from = int(latest_training_state(b / "checkpoints").name.split("_")[1])
    assert 2 <= resumed_from < 14

    done = subprocess.run(cli_args(cfg, f"run_dir={b}", "pretrain.resume=true"), check=True, env=env,
                          capture_output=True, text=True, timeout=600)
    assert f"continuing from {b / 'checkpoints'}/step_{resumed_from}" in done.stderr
    got = pretrain_losses(b)
    after = range(resumed_from + 1, 15)
    assert [got[s] for s in after] == [want[s] for s in after]  # bitwise: same floats from the same state
    assert (b / "models" / "realm" / "manifest.json").is_file()
