"""A command-line override that its command does not read is refused, naming the commands that read it;
and the table that says so (cluster.config.COMMAND_KEYS) matches what each command really reads."""
import dataclasses
import sys
import typing

import pytest

import launch
from cluster.config import COMMAND_KEYS, Config, load_config, overrides_for, readers, reads, valid_keys
from core.errors import InputError
from tests.conftest import ROOT, TINY_MODEL


class ReadRecorder:
    """Records every config leaf read (section.key) while active, by patching the config classes'
    attribute lookup. dataclasses.asdict (config.json, W&B) reads everything and is not counted."""

    def __init__(self):
        self.reads: set[str] = set()
        self.prefix: dict[int, str] = {}
        self.classes = set()
        self._collect(Config)

    def _collect(self, cls):
        self.classes.add(cls)
        for typ in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(typ):
                self._collect(typ)

    def watch(self, cfg, prefix=""):
        self.prefix[id(cfg)] = prefix
        for f in dataclasses.fields(cfg):
            v = object.__getattribute__(cfg, f.name)
            if dataclasses.is_dataclass(v):
                self.watch(v, prefix + f.name + ".")

    def __enter__(self):
        recorder = self

        def getattribute(obj, name):
            value = object.__getattribute__(obj, name)
            prefix = recorder.prefix.get(id(obj))
            if (prefix is not None and name in type(obj).__dataclass_fields__ and not dataclasses.is_dataclass(value)
                    and not sys._getframe(1).f_code.co_filename.endswith(("dataclasses.py", "copy.py"))):
                recorder.reads.add(prefix + name)
            return value

        for cls in self.classes:
            cls.__getattribute__ = getattribute
        return self

    def __exit__(self, *exc):
        for cls in self.classes:
            del cls.__getattribute__


def test_every_key_is_read_by_some_command():
    assert [k for k in valid_keys() if not readers(k)] == []
    assert all(entry.endswith(".") or entry in valid_keys() for keys in COMMAND_KEYS.values() for entry in keys)


def test_each_command_reads_only_the_keys_its_table_names(tmp_path, tiny_corpus):
    """Runs the whole local pipeline on a tiny random BERT and records what each command reads. (The Ray
    backend's actors run trainer.pretrain's same code in other processes; its driver reads cluster.*.)"""
    run = tmp_path / "run"
    changes = tmp_path / "changes.jsonl"
    changes.write_text('{"id": "new-doc", "title": "Ada", "text": "Ada was born in Paris."}\n')
    base = [*TINY_MODEL, f"run_dir={run}", "cluster.backend=local", "retrieval.k=3", "eval.k=3",
            "pretrain.freeze_retriever_steps=0", "masking.ner=regex"]
    stages = [("prepare", [f"data.corpus={tiny_corpus['corpus']}", f"data.pretrain={tiny_corpus['pretrain']}"]),
              ("ict", ["ict.steps=2", "ict.batch_size=8", "model.proj_init=pca", "model.proj_init_blocks=30"]),
              ("pretrain", ["pretrain.steps=2", "pretrain.batch_size=4", "refresh.every_steps=1"]),
              ("finetune", ["finetune.steps=2", f"data.corpus={tiny_corpus['corpus']}",
                            f"data.qa_train={tiny_corpus['qa_train']}"]),
              ("evaluate", []),
              ("evaluate", [f"data.eval={tiny_corpus['eval']}"]),
              ("evaluate", ["task=openqa", f"data.corpus={tiny_corpus['corpus']}",
                            f"data.qa_eval={tiny_corpus['qa_eval']}"]),
              ("query", ["question=Where was Ada born?"]),
              ("explain", ["question=Where was Ada born?"]),
              ("explain", ["text=Ada was born in Paris.", "answer=Paris"]),
              ("update-corpus", [f"changes={changes}"]),
              ("query", ["question=Where was Ada born?"]),  # on the edited pair
              ("reindex", [f"data.corpus={tiny_corpus['corpus']}"])]
    undeclared = {}
    for command, extra in stages:
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [*base, *extra])
        recorder = ReadRecorder()
        recorder.watch(cfg)
        with recorder:
            launch.run_command(command, cfg)
        assert "run_dir" in recorder.reads
        undeclared[command] = sorted(k for k in recorder.reads if not reads(command, k))
    assert undeclared == {c: [] for c, _ in stages}


@pytest.mark.parametrize("command,key,reader", [("evaluate", "pretrain.steps", "pretrain"),
                                                 ("ict", "data.corpus", "prepare"),
                                                 ("query", "eval.k", "evaluate"),
                                                 ("prepare", "cluster.trainers", "pretrain")])
def test_cli_refuses_a_key_the_command_does_not_read(tmp_path, capsys, command, key, reader):
    run = tmp_path / "run"
    rc = launch.main([command, f"run_dir={run}", f"{key}=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"'{key}'" in err[0] and f"'{command}'" in err[0] and reader in err[0].split("read by:")[1]
    assert not run.exists()  # refused before any work


def test_a_pipeline_skips_keys_another_of_its_commands_reads():
    shared = ["data.synthetic_entities=40", "ict.steps=2", "pretrain.steps=3", "seed=1"]
    assert overrides_for("ict", shared, ("prepare", "ict", "pretrain")) == ["ict.steps=2", "seed=1"]
    assert overrides_for("prepare", shared, ("prepare", "ict", "pretrain")) == ["data.synthetic_entities=40",
                                                                                "seed=1"]
    with pytest.raises(InputError, match=r"'finetune.steps' is not read by any of prepare, ict; .*finetune"):
        overrides_for("ict", ["finetune.steps=2"], ("prepare", "ict"))


def test_a_section_mapping_override_is_checked_key_by_key():
    assert overrides_for("ict", ["ict={lr: 1e-4, steps: 5}"]) == ["ict={lr: 1e-4, steps: 5}"]
    with pytest.raises(InputError, match="'finetune.steps' is not read by 'ict'"):
        overrides_for("ict", ["finetune={steps: 5}"])


def test_the_config_file_may_set_any_key(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}"], "evaluate")
    assert cfg.pretrain.steps > 0 and cfg.run_dir == str(tmp_path)  # tiny.yaml sets every section


@pytest.mark.parametrize("command,key,value", [("evaluate", "pretrain.init", "raw"),
                                               ("finetune", "pretrain.null_document", "false")])
def test_the_ablation_knobs_are_pretrain_keys_only(command, key, value):
    assert readers(key) == ["pretrain"]
    with pytest.raises(InputError, match=rf"'{key}' is not read by '{command}'; it is read by: pretrain"):
        overrides_for(command, [f"{key}={value}"])


@pytest.mark.parametrize("override,key", [("pretrain.init=bert", "pretrain.init"),
                                          ("masking.mode=uniformly", "masking.mode"),
                                          ("pretrain.null_document=maybe", "pretrain.null_document"),
                                          ("pretrain.null_doc=false", "pretrain.null_doc")])
def test_bad_ablation_values_fail_naming_their_key(tmp_path, override, key):
    with pytest.raises(InputError, match=rf"'{key}'"):
        load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}", override], "pretrain")
