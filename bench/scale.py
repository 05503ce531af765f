"""Scale: the whole pipeline at 1e4, 1e5 and 1e6 documents on this machine, and how each cost grows.

One command, sizes side by side in one run:

    python bench/scale.py                              # 1e4, 1e5, 1e6 documents (about an hour on 2 cores)
    python bench/scale.py --sizes 10000,100000         # fewer sizes
    python bench/scale.py --smoke                      # 200 documents, the whole machinery once (CI)

Per size, through the documented CLI (`launch.py`, each stage its own process):
- a corpus of N documents: the synthetic-knowledge corpus (indexer/synthetic.py, 2,000 people) repeated with new
  ids until it has N, streamed to JSONL (no download; the text repeats, the costs do not care);
- `prepare` with one worker: seconds and the process's peak RSS (GNU time's max RSS, which takes the larger of
  the process and any worker it waited for); salient spans by the regex tagger (spaCy at 1e6 documents would take
  hours on 2 cores, and its cost is per sentence, so linear by construction);
- `ict` (2 steps) and its index build (every block embedded in-process);
- `pretrain` on Ray (DeepSpeed trainer, embedding workers, shard servers, asynchronous refresh), enough steps for
  `--refreshes` refreshes through the embedding workers: refresh seconds and blocks/s from the coordinator's
  history; peak RSS of the trainer, embedding-worker and shard-server actors, sampled from /proc while it runs;
- top-k ms at batch 1 and 512 over the last index (`ShardedIndex`, the shard servers' search);
- bytes on disk: block store (BM25 index inside it, also given alone), examples, index versions.
The tower is random and small (`--model`, default 1 layer x 64): the point is how the machinery grows, and a
2-layer x 128 tower would take ~30 minutes a refresh at 1e6 on 2 cores. The table goes to bench/RESULTS.md and
a log-log plot of seconds and RSS against N to --plot. At `--workers-at` (default the middle size) prepare is
run again with 2 workers: the speed ratio, and whether the block store and examples are the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, add_common_args, apply_common_args, print_table, write_results  # noqa: E402

MODEL = ["model.init=random", "model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128",
         "model.retriever_layers=1", "model.reader_layers=1", "model.query_max_len=32", "model.reader_max_len=128",
         "model.retrieval_dim=128"]
BASE_PEOPLE = 2000
ACTORS = ("TrainerWorker", "EmbeddingWorker", "ShardServer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--sizes", default="10000,100000,1000000", help="documents, comma-separated")
    p.add_argument("--refreshes", type=int, default=2, help="asynchronous refreshes each pre-training must complete")
    p.add_argument("--every", type=int, default=4, help="refresh.every_steps")
    p.add_argument("--workers-at", type=int, help="size at which prepare also runs with 2 workers (default: middle)")
    p.add_argument("--work-dir", help="where the runs go (default: a temp dir, removed afterwards)")
    p.add_argument("--plot", default=str(ROOT / "docs" / "scale.png"))
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every stage (e.g. a bigger model.*)")
    return p.parse_args(argv)


def write_corpus(path: Path, n: int, work: Path) -> None:
    """N documents: the synthetic people's documents, repeated with new ids (`<id>-r<k>`), written streaming."""
    from indexer.synthetic import write_synthetic

    base = write_synthetic(work / "base_corpus", min(n, BASE_PEOPLE), 0)
    docs = [json.loads(x) for x in open(base["corpus"])]
    with open(path, "w") as f:
        for i in range(n):
            d = docs[i % len(docs)]
            f.write(json.dumps({**d, "id": f"{d['id']}-r{i // len(docs)}"}) + "\n")


def timed(cmd: list[str], log: Path, env: dict, sampler: ActorRss | None = None) -> tuple[float, float]:
    """Run a command under GNU time: (seconds, peak RSS in MB); a failure shows the log's tail. `sampler`
    samples the actors the command starts (its descendant processes) while it runs."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
        if sampler is not None:
            sampler.root = proc.pid
            sampler.start()
        try:
            returncode = proc.wait()
        finally:
            if sampler is not None:
                sampler.done.set()
                sampler.join()
    seconds = time.perf_counter() - t0
    text = log.read_text()
    if returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed (exit {returncode}); log {log}:\n{text[-3000:]}")
    return seconds, int(re.findall(r"MAXRSS_KB (\d+)", text)[-1]) / 1024


def descendants(root: int) -> set[int]:
    """`root` and every process below it (from /proc's parent ids)."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {root}
    while frontier:
        found |= frontier
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
    return found


class ActorRss(threading.Thread):
    """Peak RSS (MB) of each kind of Ray actor process the measured command started (below `root`: not
    another job's actors on the same machine), sampled from /proc twice a second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {a: 0.0 for a in ACTORS}
        self.done = threading.Event()
        self.root = os.getpid()

    def run(self):
        while not self.done.wait(0.5):
            for pid in map(str, descendants(self.root)):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    actor = next((a for a in ACTORS if f"ray::{a}".encode() in cmd), None)
                    if actor:
                        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                        self.peak[actor] = max(self.peak[actor], rss / 2 ** 20)
                except (OSError, ValueError, IndexError):
                    continue


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def digests(run: Path) -> dict:
    return {f: hashlib.sha256((run / f).read_bytes()).hexdigest()
            for f in ("blocks/blocks.arrow", "blocks/docs.arrow", "examples/train.parquet", "examples/eval.parquet")}


def topk_ms(run: Path, shards: int) -> tuple[float, float, float, float]:
    """Median ms of a top-8 search at batch 1 and 512 over the current index, of the scores alone at batch 1
    (one matrix-vector product: one pass over the rows, the memory-bandwidth floor), and the index's MB."""
    import numpy as np

    from indexer.shards import ShardedIndex
    from indexer.versions import IndexVersions

    v = IndexVersions(run / "index").current()
    emb = IndexVersions.load_rows(v)
    index = ShardedIndex(emb, num_shards=shards)
    rng = np.random.default_rng(0)
    out = []
    for batch, reps in ((1, 30), (512, 3)):
        q = rng.standard_normal((batch, emb.shape[1])).astype(np.float32)
        index.search(q, 8)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            index.search(q, 8)
            times.append(time.perf_counter() - t0)
        out.append(1000 * float(np.median(times)))
    q = rng.standard_normal(emb.shape[1]).astype(np.float32)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        emb @ q
        times.append(time.perf_counter() - t0)
    return out[0], out[1], 1000 * float(np.median(times)), emb.nbytes / 2 ** 20


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    apply_common_args(a)
    sizes = [200] if a.smoke else [int(float(s)) for s in a.sizes.split(",")]
    workers_at = a.workers_at or sizes[len(sizes) // 2]
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    py = [sys.executable, str(ROOT / "launch.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
          "--pipeline", "prepare,ict,pretrain"]
    steps = a.every * (a.refreshes + 1) + 1
    common = [*MODEL, "masking.ner=regex", "data.pretrain=", "data.eval=", "data.eval_split=documents",
              "data.eval_fraction=0.01", "data.max_eval_examples=100", *a.overrides]
    if a.threads:
        common.append(f"threads={a.threads}")
    rows, checks = [], []
    try:
        for n in sizes:
            run = work / f"n{n}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            corpus = work / f"corpus_{n}.jsonl"
            if not corpus.exists():
                write_corpus(corpus, n, work)
            over = [f"run_dir={run}", f"data.corpus={corpus}", *common]
            prep_s, prep_rss = timed([*py, "prepare", *over, "prepare.workers=1"], run / "prepare.log", env)
            if n == workers_at:
                run2 = work / f"n{n}_w2"
                shutil.rmtree(run2, ignore_errors=True)
                prep2_s, _ = timed([*py, "prepare", *[o.replace(str(run), str(run2)) for o in over],
                                    "prepare.workers=2"], work / f"prepare_w2_{n}.log", env)
                same = digests(run) == digests(run2)
                checks.append(f"prepare at {n:,} documents: 1 worker {prep_s:.1f} s, 2 workers {prep2_s:.1f} s "
                              f"({prep_s / prep2_s:.2f}x); block store and examples byte-identical: {same}")
                shutil.rmtree(run2, ignore_errors=True)
            ict_s, ict_rss = timed([*py, "ict", *over, "ict.steps=2", "ict.batch_size=8"], run / "ict.log", env)
            sampler = ActorRss()
            pre_s, pre_rss = timed([*py, "pretrain", *over, "cluster.backend=ray", f"pretrain.steps={steps}",
                                    f"refresh.every_steps={a.every}", "refresh.mode=async",
                                    f"refresh.max_staleness={a.every}", "pretrain.freeze_retriever_steps=0",
                                    "pretrain.own_block_steps=0", "pretrain.batch_size=4", "retrieval.k=2",
                                    f"pretrain.checkpoint_every={10 ** 6}", "pretrain.log_every=1"],
                                   run / "pretrain.log", env, sampler)
            summary = json.loads((run / "pretrain_summary.json").read_text())
            history = summary["refresh_history"]
            blocks = json.loads((run / "blocks" / "manifest.json").read_text())["num_blocks"]
            shards = summary.get("shards", 2)
            t1, t512, pass_ms, index_mb = topk_ms(run, shards)
            rows.append({
                "documents": n, "blocks": blocks, "prepare s": prep_s, "prepare peak RSS MB": prep_rss,
                "ict+index s": ict_s, "ict peak RSS MB": ict_rss,
                "refreshes": len(history),
                "refresh s": sum(h["embed_seconds"] for h in history) / max(1, len(history)),
                "refresh blocks/s": sum(h["blocks_per_s"] for h in history) / max(1, len(history)),
                "pretrain s": pre_s, "max staleness": summary.get("max_staleness", "-"),
                "trainer RSS MB": sampler.peak["TrainerWorker"],
                "embed worker RSS MB": sampler.peak["EmbeddingWorker"], "shard RSS MB": sampler.peak["ShardServer"],
                "index MB (one copy)": index_mb, "top-k ms b=1": t1, "scores alone ms b=1": pass_ms,
                "top-k ms b=512": t512,
                "store MB": du(run / "blocks") / 2 ** 20, "bm25 MB": du(run / "blocks" / "bm25") / 2 ** 20,
                "examples MB": du(run / "examples") / 2 ** 20, "index versions MB": du(run / "index") / 2 ** 20,
            })
            print_table(f"scale (so far, {n:,} documents)", rows)
            if len(history) < a.refreshes:
                checks.append(f"{n:,} documents: only {len(history)} of {a.refreshes} refreshes completed")
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    first = rows[0]
    for r in rows[1:]:  # growth against the smallest size
        f = r["documents"] / first["documents"]
        checks.append(f"{r['documents']:,} vs {first['documents']:,} documents ({f:g}x): prepare s "
                      f"{r['prepare s'] / first['prepare s']:.2f}x, refresh s "
                      f"{r['refresh s'] / first['refresh s']:.2f}x, "
                      f"prepare RSS {r['prepare peak RSS MB'] / first['prepare peak RSS MB']:.2f}x, trainer RSS "
                      f"{r['trainer RSS MB'] / max(first['trainer RSS MB'], 1e-9):.2f}x")
    if a.plot and not a.smoke:
        plot(rows, Path(a.plot))
    config = {"sizes": ",".join(map(str, sizes)), "model": " ".join(MODEL), "steps": steps,
              "refresh.every_steps": a.every, "ner": "regex", "smoke": a.smoke,
              "overrides": " ".join(a.overrides) or "-"}
    notes = ["RSS: prepare/ict = GNU time's max RSS of the launched process (its worker processes are separate); "
             "actors = the largest process of each kind, sampled every 0.5 s. Index memory (one fp32 copy of the "
             "embeddings) is its own column: shard servers hold their slice of it, two versions during a swap",
             "scores alone: one matrix-vector product over the index's rows (numpy), the pass a batch-1 top-k cannot "
             "beat; top-k at batch 1 goes through ShardedIndex (indexer.shards.matvec_topk per shard)",
             *checks]
    print_table("Scale: the pipeline at growing corpus sizes", rows)
    for c in checks:
        print(c)
    write_results("Scale: the pipeline at growing corpus sizes", config, rows, a.results, notes=notes)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["documents"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in ("prepare s", "ict+index s", "refresh s", "pretrain s", "top-k ms b=1", "top-k ms b=512"):
        ax1.loglog(n, [r[key] for r in rows], "o-", label=key)
    ax1.loglog(n, [rows[0]["prepare s"] * x / n[0] for x in n], "k:", label="linear")
    ax1.set_xlabel("documents")
    ax1.set_title("time")
    ax1.legend(fontsize=7)
    for key in ("prepare peak RSS MB", "trainer RSS MB", "shard RSS MB", "embed worker RSS MB", "index MB (one copy)",
                "store MB"):
        ax2.loglog(n, [max(r[key], 1e-3) for r in rows], "o-", label=key)
    ax2.set_xlabel("documents")
    ax2.set_title("memory and disk (MB)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
