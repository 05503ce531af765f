"""Acceptance: on hard synthetic knowledge, ICT + REALM pre-training learns to retrieve and to read.

The corpus (indexer/synthetic.py) holds invented people with shared-syllable names whose attributes
appear only in their own document, eight facts each with three cities and three years
(`relations=confusable`); eval statements are about people never seen in pre-training and use
paraphrases no pre-training statement uses (`phrasing=disjoint`), so the masked attribute can only be
predicted by retrieving that document and reading it, not by recalling a wording. Runs the documented
commands with configs/tiny.yaml and only those two generator keys changed (600 entities).
"""
import json

import pytest

from cluster.config import load_config
from launch import run_command
from tests.conftest import ROOT
from trainer.evaluate import evaluate
from trainer.ict import ict
from trainer.prepare import prepare

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # setup.cfg's 1200 s default is for the rest
HARD = ["data.synthetic_relations=confusable", "data.synthetic_phrasing=disjoint"]


def test_realm_learns_to_retrieve_and_read_synthetic_knowledge(tmp_path):
    def cfg(*extra):
        return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path / 'run'}", *HARD, *extra])

    prepare(cfg())
    ict(cfg())
    ict_metrics = evaluate(cfg("eval.model=ict"))
    run_command("pretrain", cfg())  # as `launch.py pretrain` runs it: tiny.yaml's cluster.backend, Ray + DeepSpeed
    realm = evaluate(cfg("eval.model=realm"))
    print(json.dumps({"ict": ict_metrics, "realm": realm}, indent=2))

    chance = ict_metrics["k"] / cfg().data.synthetic_entities  # one gold document among single-block documents
    assert ict_metrics["retrieval_recall_at_k"] > 10 * chance
    assert realm["retrieval_recall_at_k"] > ict_metrics["retrieval_recall_at_k"]
    assert realm["mlm_accuracy"] >= realm["mlm_accuracy_no_retrieval"] + 0.3
