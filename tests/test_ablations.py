"""bench/ablations.py --smoke: both variants in the table with numbers, and a second invocation skips them."""
import json
import os
import shutil
import subprocess
import sys

from core.env import OFFLINE_ENV
from tests.test_bench_smoke import ROOT, check_section, table


def run_ablations(work, results, *overrides, ok=True):
    env = dict(os.environ, **OFFLINE_ENV, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ablations.py"), "--smoke", "--device", "cpu",
                           "--seeds", "1", "--work", str(work), "--results", str(results), *overrides],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert (proc.returncode == 0) == ok, f"ablations:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_ablations_smoke_table_and_resume(tmp_path):
    work, results = tmp_path / "work", tmp_path / "RESULTS.md"
    first = run_ablations(work, results)
    assert "ran reference seed 0" in first and "ran no_null_doc seed 0" in first
    text = results.read_text()
    check_section(text, "REALM ablations (Table 2)")
    rows = {r["variant"]: r for r in table(text, "variant")}
    assert set(rows) == {"reference", "no_null_doc"}
    assert rows["no_null_doc"]["changes"] == "pretrain.null_document=false" and rows["reference"]["changes"] == "-"
    for row in rows.values():
        for key in ("mlm_acc", "mlm_acc_no_retrieval", "recall@k", "openqa_em", "wall_min", "refreshes",
                    "mean_staleness"):
            float(row[key].replace(",", ""))  # a number, not n/a
    assert float(rows["reference"]["refreshes"]) > 0  # smoke refreshes every 2 of 8 steps
    assert rows["reference"]["commits"] not in ("", "unrecorded")  # each variant names the code it ran
    assert json.loads((work / "no_null_doc-seed0" / "run" / "models" / "realm" / "realm.json").read_text()
                      )["null_document"] is False
    assert (work / "ablations.png").stat().st_size > 0

    assert json.loads((work / "results" / "reference-seed0.json").read_text())["variant"] == "reference"
    shutil.rmtree(work / "reference-seed0")  # the recorded result is enough: its run dir is not needed
    second = run_ablations(work, results)  # resume: nothing runs again, the same rows come back
    assert "skipped reference seed 0" in second and "skipped no_null_doc seed 0" in second and "ran " not in second
    assert table(results.read_text(), "variant") == list(rows.values())
    # a recorded result belongs to its recipe: another one is refused, never mixed into the table
    out = run_ablations(work, results, "data.synthetic_entities=30", ok=False)
    assert "reference-seed0.json: recorded for" in out and "give another --record directory" in out
