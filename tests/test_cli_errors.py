"""Bad input through the documented CLI: exit status 2, one line naming file:line or key, and
nothing half-written in the run directory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config, valid_keys
from core.env import OFFLINE_ENV
from core.errors import InputError
from tests.conftest import ROOT, write_jsonl

GOOD = {"id": "a", "title": "T", "text": "Alice went to Paris in 1990."}


def launch(*args, cwd=None, **popen):
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, **popen)


def run_dir_is_clean(run_dir: Path) -> bool:
    """No block store, examples or temp dirs left behind."""
    if not run_dir.exists():
        return True
    names = {p.name for p in run_dir.iterdir()}
    return not ({"blocks", "examples"} & names) and not any(n.startswith((".tmp", ".old")) for n in names)


@pytest.mark.parametrize("content, expected", [
    (b'{"id": "a", "title": "T", "text": "ok"}\n{"id": "b", "title": ', "corpus.jsonl:2: malformed JSON"),
    (b'{"id": "a", "text": "no title"}\n', "corpus.jsonl:1: missing field 'title'"),
    (b'{"id": "a", "title": "T", "text": ""}\n', "corpus.jsonl:1: field 'text' is empty"),
    (b'{"id": "a", "title": "T", "text": "\xc3\x28"}\n', "corpus.jsonl:1: not valid UTF-8"),
    (b'[1, 2, 3]\n', "corpus.jsonl:1: expected a JSON object"),
])
def test_bad_corpus_exits_2_with_one_line_and_writes_nothing(tmp_path, content, expected):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(content)
    run_dir = tmp_path / "run"
    r = launch("prepare", f"run_dir={run_dir}", f"data.corpus={corpus}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], r.stderr
    assert run_dir_is_clean(run_dir)


def test_bad_pretrain_line_is_named_and_nothing_is_left(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [GOOD])
    pre = write_jsonl(tmp_path / "pre.jsonl", [{"text": "Alice lives in Paris.", "answer": "Paris"},
                                              {"text": "Bob is here.", "answer": "London"}])
    run_dir = tmp_path / "run"
    r = launch("prepare", f"run_dir={run_dir}", f"data.corpus={corpus}", f"data.pretrain={pre}")
    assert r.returncode == 2
    assert "pre.jsonl:2: answer 'London' is not a non-empty substring of text" in r.stderr
    assert not (run_dir / "examples").exists()


def test_unknown_source_id_is_named(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [GOOD])
    pre = write_jsonl(tmp_path / "pre.jsonl", [{"text": "Alice lives in Paris.", "source_id": "zzz"}])
    r = launch("prepare", f"run_dir={tmp_path / 'run'}", f"data.corpus={corpus}", f"data.pretrain={pre}")
    assert r.returncode == 2 and "pre.jsonl:1: source_id 'zzz' is not an id in the corpus" in r.stderr


def test_missing_corpus_file(tmp_path):
    r = launch("prepare", f"run_dir={tmp_path / 'run'}", f"data.corpus={tmp_path / 'nope.jsonl'}")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: file not found"


def test_unknown_config_key_lists_valid_keys(tmp_path):
    r = launch("prepare", f"run_dir={tmp_path / 'run'}", "retrieval.kk=3")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "unknown config key 'retrieval.kk'" in line and "retrieval.k," in line
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_yaml_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain:\n  stepz: 3\n")
    with pytest.raises(InputError, match="unknown config key 'pretrain.stepz'"):
        load_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("retrieval.k=0", "'retrieval.k': must be positive"),
    ("retrieval.k=-2", "'retrieval.k': must be positive"),
    ("pretrain.steps=ten", "'pretrain.steps': expected an integer"),
    ("masking.mode=whole", "'masking.mode': expected one of salient, random"),
    ("data.synthetic_relations=hard", "'data.synthetic_relations': expected one of basic, confusable"),
    ("model.reader_head=pointer", "'model.reader_head': expected one of mlm, copy"),
    ("model.copy_init=eye", "'model.copy_init': expected one of random, identity"),
    ("model.copy_layer=7", "'model.copy_layer': a reader layer from 1 to 6, or 0 for the last, got 7"),
    ("model.copy_layer=-1", "'model.copy_layer': a reader layer from 1 to 6"),
    ("model.reader_head=mlm model.copy_layer=1", "'model.copy_layer': sets up the copy head, which "
     "model.reader_head=mlm does not have"),
    ("finetune.early_k=-1", "'finetune.early_k': must not be negative"),
    ("finetune.early_k=50 finetune.retrieval=random", "'finetune.early_k': the early update ranks the retriever's"),
    ("pretrain.lr=1e-4", None),
    # tiny freezes the retriever for 150 steps: reading the own block longer would teach it string matching
    ("pretrain.own_block_steps=151", "'pretrain.own_block_steps': must be between 0 and"),
])
def test_config_values_are_typed_and_checked(override, message):
    if message is None:
        assert load_config(ROOT / "configs" / "tiny.yaml", override.split()).pretrain.lr == 1e-4
    else:
        with pytest.raises(InputError, match=message):
            load_config(ROOT / "configs" / "tiny.yaml", override.split())


def test_every_shipped_config_loads():
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)
    assert "data.corpus" in valid_keys() and "run_dir" in valid_keys()


def test_evaluate_before_prepare_names_the_missing_store(tmp_path):
    r = launch("evaluate", f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "no block store here (run `launch.py prepare` first)" in r.stderr
