"""W&B offline logging, the no-W&B report, and that no secret reaches the run directory."""
import json
from pathlib import Path

from trainer.ict import ict
from trainer.prepare import prepare
from trainer.pretrain import pretrain
from trainer.report import report

SECRET = "wandb-key-0123456789abcdef0123456789abcdef"


def test_wandb_offline_and_report_without_leaking_the_key(tiny_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg("ict.steps=2", "pretrain.steps=3", "refresh.every_steps=2", "pretrain.log_every=1",
                   "wandb.enabled=true", "wandb.mode=offline")
    prepare(cfg)
    ict(cfg)
    pretrain(cfg)
    run_dir = Path(cfg.run_dir)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"
    events = [json.loads(line) for line in open(run_dir / "events.jsonl")]
    logged = {k for e in events if e["job"] == "pretrain" for k in e}
    for key in ("loss", "mlm_accuracy", "gold_in_topk", "retrieval_entropy", "index_version", "staleness",
                "refresh_seconds", "tokens_per_s"):
        assert key in logged, key
    written = report(run_dir)
    assert set(written) == {"ict", "pretrain"}
    assert all(Path(p).stat().st_size > 10_000 for p in written.values())
    for f in run_dir.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert SECRET.encode() not in f.read_bytes(), f"W&B key found in {f}"
