"""The benchmark scripts run end to end (--smoke: tiny shapes, CPU, seconds) and write their table."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.env import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, results: Path, *extra: str) -> str:
    env = dict(os.environ, **OFFLINE_ENV, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--device", "cpu",
                           "--results", str(results), *extra],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return results.read_text()


def table(text: str, first_col: str) -> list[dict[str, str]]:
    """The first markdown table in `text` whose header starts with `first_col`, as dicts."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_col} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))))
    return rows


def check_section(text: str, title: str) -> None:
    assert text.startswith("# Benchmark results")
    assert f"## {title}" in text
    for key in ("- commit:", "- cpu:", "- torch:", "- config:", "- command:"):
        assert key in text


def test_embed_throughput_smoke(tmp_path):
    text = run_bench("embed_throughput.py", tmp_path / "R.md")
    check_section(text, "Doc-encoder embedding throughput")
    rows = table(text, "batch")
    assert {(r["precision"], r["attn"]) for r in rows} == {("fp32", "eager"), ("fp32", "sdpa")}
    assert all(float(r["blocks/s"].replace(",", "")) > 0 for r in rows)
    assert {r["x base(same batch)"] for r in rows if r["attn"] == "eager"} == {"1.00"}
    assert all(r["MFU(bf16 peak)"] == "n/a" for r in rows)  # no peak for a CPU


def test_train_step_smoke(tmp_path):
    text = run_bench("train_step.py", tmp_path / "R.md")
    check_section(text, "REALM training step")
    (row,) = table(text, "batch")
    shares = [float(row[f"{p} %"]) for p in ("retrieval", "re-encode", "reader", "bwd+opt")]
    assert all(s > 0 for s in shares) and abs(sum(shares) - 100) < 0.5
    assert float(row["examples/s"].replace(",", "")) > 0


def test_topk_smoke_recall_and_prepend(tmp_path):
    results = tmp_path / "R.md"
    results.write_text("# Benchmark results\n\nNewest first. Written by `bench/*.py` (see bench/README.md); "
                       "do not edit by hand.\n\n## older section\n\nkept\n")
    # --torch on: the chunked torch path (our GPU path) runs on CPU too, so CI covers its code.
    text = run_bench("topk.py", results, "--torch", "on", "--torch-dtypes", "fp32")
    check_section(text, "Exact top-8 search")
    rows = table(text, "rows")
    assert {r["method"] for r in rows} >= {"numpy (HF)", "faiss flat", "sharded x4", "torch cpu fp32"}
    assert {r["batch"] for r in rows} == {"1", "512"}
    assert [r["recall"] for r in rows] == ["1.0"] * len(rows)
    # Newest first: the new section sits above the older one, which is kept.
    assert text.index("## Exact top-8 search") < text.index("## older section") and text.rstrip().endswith("kept")


def test_ann_smoke_against_flat(tmp_path):
    text = run_bench("ann.py", tmp_path / "R.md")
    check_section(text, "Approximate indexes (index.kind) against flat")
    rows = {(r["kind"], r["nprobe / ef"]): r for r in table(text, "rows")}
    assert set(k for k, _ in rows) == {"flat", "ivf", "hnsw", "ivfpq"}
    recall = {key: float(r["recall@10 vs flat"]) for key, r in rows.items()}
    assert recall[("flat", "")] == 1.0 and recall[("ivf", "8")] <= recall[("ivf", "32")] <= 1.0
    assert float(rows[("ivfpq", "32")]["bytes/row"]) < float(rows[("flat", "")]["bytes/row"])


def test_flop_count_matches_hand_derivation():
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.common import (
        bert_encoder_flops,
        bert_layer_flops_per_token,
        peak_bf16_flops,
    )

    h, L = 768, 288
    assert bert_layer_flops_per_token(L, h, 4 * h) == 24 * h * h + 4 * L * h
    assert bert_encoder_flops(2, L, 12, h, 4 * h) == 2 * L * 12 * (24 * h * h + 4 * L * h)
    assert peak_bf16_flops(torch.device("cpu")) is None  # MFU is "n/a" on a CPU


def test_torch_fallback_index_matches_sharded_index_with_exclusions():
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from bench.train_step import TorchIndex
    from indexer.shards import ShardedIndex

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1000, 16), dtype=np.float32)
    q = rng.standard_normal((5, 16), dtype=np.float32)
    top1 = (q @ emb.T).argmax(1)
    exclude = np.stack([top1, np.full(5, -1)], 1)  # the best row is excluded; -1 is padding
    ref_s, ref_i = ShardedIndex(emb, 3).search(q, 4, exclude)
    got_s, got_i = TorchIndex(emb, torch.device("cpu")).search(q, 4, exclude)
    assert (got_i == ref_i).all() and not np.isin(top1, got_i).any()
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-5)


def test_refresh_stall_smoke(tmp_path):
    text = run_bench("refresh_stall.py", tmp_path / "R.md")
    check_section(text, "Refresh stall: asynchronous vs stop-the-world")
    rows = {r["refresh mode"]: r for r in table(text, "refresh mode")}
    assert set(rows) == {"async", "sync", "sync / async"}
    for mode in ("async", "sync"):
        assert int(rows[mode]["steps"]) == 6 and int(rows[mode]["refreshes"]) >= 1


def test_scale_smoke(tmp_path):
    """One small size through prepare (1 and 2 workers), ICT, pre-training on Ray with asynchronous refreshes
    and top-k: every column is measured, and the two prepares wrote the same bytes."""
    text = run_bench("scale.py", tmp_path / "R.md", "--work-dir", str(tmp_path / "w"))
    check_section(text, "Scale: the pipeline at growing corpus sizes")
    (row,) = table(text, "documents")
    assert int(row["documents"]) == 200 and int(row["blocks"]) == 200
    def num(key: str) -> float:  # the table writes thousands with commas
        return float(row[key].replace(",", ""))

    assert int(row["refreshes"]) >= 2 and num("refresh blocks/s") > 0
    for key in ("prepare peak RSS MB", "trainer RSS MB", "shard RSS MB", "embed worker RSS MB", "top-k ms b=1"):
        assert num(key) > 0, key
    assert "byte-identical: True" in text


def test_e2e_demo_smoke(tmp_path):
    text = run_bench("e2e_demo.py", tmp_path / "R.md")
    check_section(text, "End-to-end demo wall time")
    stages = [r["stage"] for r in table(text, "stage")]
    assert stages == ["prepare", "ict", "evaluate eval.model=ict", "pretrain", "evaluate eval.model=realm", "finetune",
                      "evaluate task=openqa", "total"]


# about 3.5 min on 2 busy cores (a small run trained, two services started, ~30 s of load, an update-corpus,
# a reader replica restarted):
# over the default run's budget for one smoke test, so with the slow tests (REALM_SLOW_TESTS=1 in .ci/run)
@pytest.mark.slow
def test_serve_load_smoke(tmp_path):
    """The real service under a few seconds of load, batched and not, with an update-corpus in the middle, bad
    requests interleaved with good ones and the reader replica killed (the script itself fails on a failed
    request, a version going backwards, a service left on the old version, a bad request answered other than
    by its 4xx, or a wrong answer around the kill)."""
    text = run_bench("serve_load.py", tmp_path / "R.md", "--update-corpus", "--kill")
    check_section(text, "Open-QA service under load (loopback)")
    rows = table(text, "mode")
    assert [(r["mode"], r["clients"]) for r in rows] == [
        ("batched", "1"), ("batched", "4"), ("batched + update-corpus", "4"),
        ("27 bad requests (15 kinds) + 13 good, interleaved", "8"),
        ("reader replica killed (SIGKILL by PID) under load", "4"), ("batching off", "1"),
        ("batching off", "4"), ("batched / batching off", "4"), ("launch.py query (one question)", "1")]
    for r in rows[:3] + rows[5:7]:
        assert int(r["requests"]) > 0 and r["errors"] == "0" and float(r["req/s"].replace(",", "")) > 0
    assert float(rows[6]["mean batch"]) == 1.0  # batching off: one request a batch
    assert "non-decreasing: yes" in rows[2]["swap"] and rows[2]["added EM"].endswith("/12")  # 3 people, 4 facts
    assert int(rows[2]["swap"].split("; ")[1].split()[0]) > 0  # answers from the new version during the load
    assert rows[3]["bad"] == "27/27 refused with a 4xx naming the field" and rows[3]["good"] == "13/13 answered"
    assert "replaced" in rows[4]["kill"] and ", 0 wrong" in rows[4]["kill"]
    assert float(rows[8]["p50 ms"].replace(",", "")) > 0


def test_reader_probe_smoke(tmp_path):
    text = run_bench("reader_probe.py", tmp_path / "R.md")
    check_section(text, "Reader probe: own-block reading by copy-head setting")
    rows = table(text, "copy_layer")
    assert [(r["copy_layer"], r["copy_init"]) for r in rows] == [("0", "random"), ("1", "identity")]
    for r in rows:
        assert [k for k in r if k.startswith("step ")] == ["step 0", "step 2", "step 4"]
        assert all(0 <= float(r[f"step {s}"]) <= 1 for s in (0, 2, 4))


def test_results_file_keeps_its_own_header(tmp_path):
    """A second writer with another default header, or a hand-edited introduction, neither stacks nor replaces the
    file's title: new sections go newest first under it, the old ones stay below."""
    from bench.common import write_results
    path = tmp_path / "RESULTS.md"
    write_results("first", {"a": 1}, [{"x": 1}], path, header="# Mine\n\nHand-written introduction.\n",
                  command="one")
    write_results("second", {"a": 2}, [{"x": 2}], path, header="# Another writer's title\n", command="two")
    text = path.read_text()
    assert text.startswith("# Mine\n\nHand-written introduction.\n\n## second")
    assert text.count("\n# ") == 0 and "Another writer" not in text
    assert text.index("## second") < text.index("## first")
    fresh = tmp_path / "new.md"
    write_results("only", {}, [{"x": 3}], fresh, header="# Fresh\n", command="three")
    assert fresh.read_text().startswith("# Fresh\n\n## only")
