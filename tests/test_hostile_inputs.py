"""Hostile and damaged input through the CLI, beyond tests/test_cli_errors.py: each case gets a
non-zero exit, one `error:` line naming the file (and line) or key, and nothing half-written.
docs/BAD_INPUT.md lists every case with the message it gets."""
import json
import os
import pickle
import resource
import shutil
import signal
from pathlib import Path

import pytest

from core.files import write_manifest
from tests.conftest import TINY_MODEL, write_jsonl
from tests.test_cli_errors import GOOD, launch


def error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and lines and lines[-1].startswith("error: "), r.stderr[-2000:]
    return lines[-1]


def no_temp_left(run_dir: Path) -> bool:
    return not any(p.name.startswith((".tmp", ".old", ".staging")) for p in run_dir.rglob("*"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A prepared tiny run with an ICT model and its index (random 1-layer BERT)."""
    from indexer.synthetic import write_synthetic

    base = tmp_path_factory.mktemp("hostile")
    paths = write_synthetic(base / "data", num_entities=30, seed=1)
    run = base / "run"
    # one set of overrides for every command these tests run, as a multi-stage script passes them
    common = ["--pipeline", "prepare,ict,pretrain,evaluate",
              f"run_dir={run}", f"data.corpus={paths['corpus']}", f"data.pretrain={paths['pretrain']}",
              f"data.eval={paths['eval']}", "ict.steps=1", "ict.batch_size=4", "retrieval.k=2", "eval.k=2",
              "cluster.backend=local", *TINY_MODEL]
    for cmd in ("prepare", "ict"):
        r = launch(cmd, *common)
        assert r.returncode == 0, r.stderr[-2000:]
    return run, common


def copy_run(trained_run, tmp_path) -> tuple[Path, list[str]]:
    run, common = trained_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst, [c if not c.startswith("run_dir=") else f"run_dir={dst}" for c in common]


# ---- corpus ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, expected", [
    ([{"id": "a", "title": "T", "text": 5}], "corpus.jsonl:1: field 'text' must be a string, got int"),
    ([GOOD, dict(GOOD)], "corpus.jsonl:2: duplicate id 'a' (first at"),
    ([], "empty corpus (no documents)"),
    ([{"id": "a", "title": ["T"], "text": "x"}], "corpus.jsonl:1: field 'title' must be a string, got list"),
])
def test_bad_corpus_rows(tmp_path, rows, expected):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    run = tmp_path / "run"
    assert expected in error_line(launch("prepare", f"run_dir={run}", f"data.corpus={corpus}"))
    assert not (run / "blocks").exists()


def test_a_50_mb_document_is_refused_by_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        f.write(json.dumps(GOOD) + "\n")
        f.write(json.dumps({"id": "huge", "title": "H", "text": "word " * 10_000_000}) + "\n")
    run = tmp_path / "run"
    line = error_line(launch("prepare", f"run_dir={run}", f"data.corpus={corpus}"))
    assert "corpus.jsonl:2:" in line and "data.max_doc_bytes" in line
    assert not (run / "blocks").exists()


def test_a_full_disk_mid_write_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past 320 KiB (more than the vocabulary file,
    less than the block store) fail with EFBIG."""
    from indexer.synthetic import write_synthetic

    paths = write_synthetic(tmp_path / "data", num_entities=1500, seed=0)
    run = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write() instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (320 * 1024, 320 * 1024))

    r = launch("prepare", f"run_dir={run}", f"data.corpus={paths['corpus']}", "masking.ner=regex",
               preexec_fn=limit)
    line = error_line(r)
    assert "File too large" in line and str(run) in line
    assert not (run / "blocks").exists() and no_temp_left(run)


class Payload:
    """Unpickling this runs a shell command that creates `marker`: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- checkpoints -------------------------------------------------------------------------------

def test_missing_and_foreign_checkpoints(trained_run, tmp_path):
    run, common = copy_run(trained_run, tmp_path)
    line = error_line(launch("evaluate", *common, f"eval.model={tmp_path / 'nope'}"))
    assert f"{tmp_path / 'nope'}: checkpoint not found" in line
    line = error_line(launch("evaluate", *common, f"eval.model={run / 'blocks'}"))
    assert f"{run / 'blocks'}: not a REALM model checkpoint (kind='block_store')" in line


def test_a_pickle_disguised_as_weights_is_never_unpickled(trained_run, tmp_path):
    run, common = copy_run(trained_run, tmp_path)
    marker = tmp_path / "pwned"
    model = run / "models" / "ict"
    (model / "query_encoder" / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    meta = json.loads((model / "realm.json").read_text())
    write_manifest(model, meta)  # checksums match: only the format can refuse it
    line = error_line(launch("evaluate", *common, "eval.model=ict"))
    assert "query_encoder: corrupt or foreign BERT checkpoint" in line
    assert not marker.exists()


def test_a_pickle_disguised_as_a_training_state_is_refused(trained_run, tmp_path):
    run, common = copy_run(trained_run, tmp_path)
    marker = tmp_path / "pwned"
    state = run / "checkpoints" / "step_2"
    state.mkdir(parents=True)
    (state / "engine.pt").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(state, {"kind": "training_state", "step": 2})
    line = error_line(launch("pretrain", *common, "pretrain.steps=4", "pretrain.resume=true"))
    assert f"{state / 'engine.pt'}: refused" in line
    assert not marker.exists()


def test_a_training_state_of_another_model_size_is_refused(trained_run, tmp_path):
    run, common = copy_run(trained_run, tmp_path)
    r = launch("pretrain", *common, "pretrain.steps=2", "pretrain.checkpoint_every=1", "refresh.every_steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.rmtree(run / "models" / "ict")  # the resumed run starts from model.init: make it another size
    line = error_line(launch("pretrain", *common, "pretrain.steps=4", "pretrain.resume=true",
                             "model.hidden_size=48", "model.intermediate_size=96"))
    assert f"{run / 'checkpoints' / 'step_1'}" in line and "another model size" in line


def test_truncated_checkpoint_and_corrupt_index_are_named(trained_run, tmp_path):
    run, common = copy_run(trained_run, tmp_path)
    current = (run / "index" / "CURRENT").read_text().strip()
    slice_file = run / "index" / current / "slice_000.npy"
    data = bytearray(slice_file.read_bytes())
    data[-1] ^= 0xFF
    slice_file.write_bytes(bytes(data))
    line = error_line(launch("evaluate", *common, "eval.model=ict"))
    assert f"{slice_file}: truncated or corrupt embedding slice" in line
    heads = run / "models" / "ict" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:100])
    line = error_line(launch("evaluate", *common, "eval.model=ict"))
    assert f"{heads}: truncated or changed" in line


def test_current_pointing_at_a_missing_version(trained_run, tmp_path):
    run, common = copy_run(trained_run, tmp_path)
    (run / "index" / "CURRENT").write_text("v0999")
    line = error_line(launch("pretrain", *common, "pretrain.steps=1", "cluster.backend=ray"))
    assert "index/CURRENT: points to 'v0999', which is not a complete index version" in line


def test_bad_config_files(tmp_path):
    assert "nope.yaml: config file not found" in error_line(launch("prepare", "--config", str(tmp_path / "nope.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [1, 2\n")
    assert "bad.yaml: not valid YAML" in error_line(launch("prepare", "--config", str(bad)))
    assert "config key 'cluster.zero_stage': expected one of 0, 1, 2, got 3" in error_line(
        launch("pretrain", "cluster.zero_stage=3"))
