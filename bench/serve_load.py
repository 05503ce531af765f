"""Load test of the Open-QA service (`launch.py serve`) over loopback: N concurrent clients for T seconds,
batched (serve.max_batch_size as configured) and with batching off (serve.max_batch_size=1): requests/s,
p50/p99 latency, errors, the ratio; one client's p50 against `launch.py query`'s answering time; with
--update-corpus, an `update-corpus` that adds documents commits during the batched load (0 failed requests,
each client's versions non-decreasing, the added people's questions answered after the swap).

    python bench/serve_load.py --run-dir RUN                      # 32 clients x 60 s (a fine-tuned tiny run)
    python bench/serve_load.py --run-dir RUN --update-corpus      # + an update-corpus adding 20 people mid-load
    python bench/serve_load.py --smoke --update-corpus            # tiny random model, 4 clients x 3 s (CI)

The clients are threads of this process (keep-alive HTTP/1.1, one connection each); the service runs in its
own processes (Ray, Serve's proxy, the replica), so on a small machine they share the cores.
"""
from __future__ import annotations

import argparse
import http.client
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
from cluster.serve_client import http_json, serving  # noqa: E402
from core.env import OFFLINE_ENV  # noqa: E402

SMOKE_SERVE = ["model.query_max_len=32", "model.reader_max_len=96", "finetune.k=3"]  # small_qa_run's model


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def load(port: int, questions: list[str], clients: int, seconds: float, during=None, extend_s: float = 120) -> dict:
    """`clients` threads asking questions round-robin for `seconds`; `during()` runs in another thread meanwhile
    and returns {"summary": update-corpus's result, ...}: then the clients go on past `seconds` (at most
    `extend_s` more) until one of them is answered from the version it committed. Returns counts, latencies (s)
    of answered requests, errors, and each client's sequence of index versions."""
    stop_at = time.monotonic() + seconds
    side: dict = {}
    side_done, seen_new = threading.Event(), threading.Event()
    if during is None:
        side_done.set()
        seen_new.set()

    def going() -> bool:
        now = time.monotonic()
        if now < stop_at:
            return True
        return not (side_done.is_set() and (seen_new.is_set() or "summary" not in side)) and now < stop_at + extend_s
    lat: list[list[float]] = [[] for _ in range(clients)]
    versions: list[list[int]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = c
        while going():
            q = questions[i % len(questions)]
            i += clients
            t0 = time.perf_counter()
            try:
                status, body = http_json(port, "POST", "/v1/answer", {"question": q}, conn=conn)
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            if status != 200:
                errors.append(f"{status}: {body}")
                continue
            lat[c].append(time.perf_counter() - t0)
            versions[c].append(body["index_version"])
            if side_done.is_set() and "summary" in side and body["index_version"] == side["summary"]["index_version"]:
                seen_new.set()
        conn.close()

    def run_side() -> None:
        try:
            side.update(during())
        finally:
            side_done.set()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        helper = threading.Thread(target=run_side)
        helper.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # the clients' time: from the first request to the last answer
    if during is not None:
        helper.join()
    flat = [x for xs in lat for x in xs]
    return {"answered": len(flat), "wall": wall, "latencies": flat, "errors": errors, "versions": versions,
            "side": side}


def row(mode: str, clients: int, r: dict, health: dict) -> dict:
    lat = r["latencies"]
    return {"mode": mode, "clients": clients, "seconds": r["wall"], "requests": r["answered"],
            "req/s": r["answered"] / r["wall"] if r["wall"] else None,
            "p50 ms": percentile(lat, 50) * 1e3 if lat else None, "p99 ms": percentile(lat, 99) * 1e3 if lat else None,
            "errors": len(r["errors"]),
            "mean batch": health["answered"] / health["batches"] if health.get("batches") else None}


def query_seconds(run_dir: Path, extra: list[str], question: str, env: dict) -> tuple[float, float]:
    """`launch.py query`: (its answering time as it reports it, the process's wall time)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "query", f"run_dir={run_dir}", *extra,
                           f"question={question}", "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"launch.py query failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["query_seconds"], wall


def update_corpus_during(run_dir: Path, changes: Path, extra: list[str], env: dict, delay: float):
    def run() -> dict:
        time.sleep(delay)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "update-corpus", f"run_dir={run_dir}",
                               f"changes={changes}", *extra], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            return {"failed": proc.stderr[-3000:]}
        return {"summary": json.loads(proc.stdout.strip().splitlines()[-1]), "committed_at": time.perf_counter(),
                "seconds": time.perf_counter() - t0}
    return run


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--run-dir", help="a fine-tuned run (copied: the original is never edited); --smoke makes one")
    p.add_argument("--questions", help="JSONL with 'question' (default: RUN/data/qa_eval.jsonl)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--update-corpus", action="store_true", help="add --add people by update-corpus mid-load")
    p.add_argument("--add", type=int, default=20, help="people the update-corpus adds")
    p.add_argument("--bad", type=int, default=1000, help="bad requests interleaved with good ones (0: none)")
    p.add_argument("--kill", action="store_true", help="kill the reader replica by PID under load; time recovery")
    p.add_argument("--batch-curve", action="store_true",
                   help="also time the QA model in this process at batch 1..32 (no HTTP): what batching can gain here")
    p.add_argument("overrides", nargs="*", help="config overrides for the service (dotted keys)")
    a = p.parse_args(argv)
    apply_common_args(a)
    if a.smoke:
        a.clients, a.seconds, a.add, a.bad = min(a.clients, 4), min(a.seconds, 3.0), min(a.add, 3), min(a.bad, 27)
    elif not a.run_dir:
        p.error("--run-dir is required (a fine-tuned run), or --smoke")
    env = dict(os.environ, **OFFLINE_ENV)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        if a.smoke:
            from tests.conftest import small_qa_run  # a random tiny BERT, prepared and fine-tuned in seconds

            small = small_qa_run(work / "small")
            src, qfile, extra = small["run"], Path(a.questions or small["data"]["qa_eval"]), SMOKE_SERVE
        else:
            src = Path(a.run_dir)
            qfile, extra = Path(a.questions or src / "data" / "qa_eval.jsonl"), []
        questions = [json.loads(line)["question"] for line in open(qfile) if line.strip()]
        extra = [*extra, *(f"threads={a.threads}" for _ in [0] if a.threads), *a.overrides]
        rows, notes = run_all(a, src, work, questions, extra, env)
        if a.batch_curve:
            rows += batch_curve(src, work, questions, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table("Serving under load", rows)
    write_results("Open-QA service under load (loopback)",
                  {"run": "smoke (random tiny BERT)" if a.smoke else a.run_dir, "clients": a.clients,
                   "seconds": a.seconds, "update_corpus": a.update_corpus, "bad": a.bad, "kill": a.kill,
                   "overrides": " ".join(a.overrides) or "-"},
                  rows, a.results, notes=notes)
    return rows


def run_all(a, src: Path, work: Path, questions: list[str], extra: list[str], env: dict) -> tuple[list, list]:
    rows, notes = [], []
    one_client_p50 = {}
    for mode, knob in (("batched", []), ("batching off", ["serve.max_batch_size=1"])):
        run_dir = work / f"run-{len(rows)}"
        shutil.copytree(src, run_dir)  # update-corpus edits its copy only
        with serving([f"run_dir={run_dir}", *extra, *knob, "serve.poll_seconds=0.2"], env=env) as svc:
            load(svc.port, questions, 1, min(2.0, a.seconds))  # warm-up: first batches, torch's lazy init
            base = svc.get("/v1/health")[1]
            single = load(svc.port, questions, 1, a.seconds)
            h1 = svc.get("/v1/health")[1]
            rows.append(row(mode, 1, single, _delta(h1, base)))
            one_client_p50[mode] = rows[-1]["p50 ms"]
            many = load(svc.port, questions, a.clients, a.seconds)
            rows.append(row(mode, a.clients, many, _delta(svc.get("/v1/health")[1], h1)))
            if many["errors"]:
                notes.append(f"{mode}: {len(many['errors'])} errors, first: {many['errors'][0][:300]}")
            if a.update_corpus and mode == "batched":  # the same load again, an update-corpus committing in it
                added = _added_people(a.add)
                changes = work / "changes.jsonl"
                changes.write_text("".join(json.dumps(d) + "\n" for d in added["corpus"]))
                upd_extra = [x for x in extra if x.startswith("threads=")] or ["threads=1"]
                h2 = svc.get("/v1/health")[1]
                during = load(svc.port, questions, a.clients, a.seconds,
                              update_corpus_during(run_dir, changes, upd_extra, env, a.seconds / 3))
                rows.append(row(f"{mode} + update-corpus", a.clients, during, _delta(svc.get("/v1/health")[1], h2)))
                rows[-1].update(_check_swap(svc, during, added))
            if a.bad and mode == "batched":
                rows.append(bad_requests(svc.port, questions, a.bad))
            if a.kill and mode == "batched":
                rows.append(kill_reader(svc, questions, a.clients, a.seconds))
        if svc.rc:
            raise SystemExit(f"serve exited {svc.rc}: {svc.log_tail()}")
    b, u = rows[1], rows[-1]
    rows.append({"mode": "batched / batching off", "clients": a.clients,
                 "req/s": b["req/s"] / u["req/s"] if u["req/s"] else None,
                 "p50 ms": b["p50 ms"] / u["p50 ms"] if b["p50 ms"] and u["p50 ms"] else None,
                 "p99 ms": b["p99 ms"] / u["p99 ms"] if b["p99 ms"] and u["p99 ms"] else None})
    answering, wall = query_seconds(src, [x for x in extra if not x.startswith("serve.")], questions[0], env)
    rows.append({"mode": "launch.py query (one question)", "clients": 1, "requests": 1,
                 "p50 ms": answering * 1e3, "seconds": wall})
    notes.append(f"one client's p50 {one_client_p50['batched']:.1f} ms (batched), "
                 f"{one_client_p50['batching off']:.1f} ms (batching off) vs `launch.py query`'s answering time "
                 f"{answering * 1e3:.1f} ms ({wall:.1f} s with its process start and model load)")
    notes.append("p50/p99: per-request latency at the client (loopback HTTP, keep-alive); mean batch: requests "
                 "per batch the replica ran during that row; the last row's p50 is query's `query_seconds`")
    return rows, notes


# the kinds of bad request the service must refuse with a 4xx naming the field: (body, field, status)
BAD_KINDS = [(b"{not json", "body", 400), (b"\xff\xfe", "body", 400), (b"[1, 2]", "body", 400),
             ({}, "question", 400), ({"question": ""}, "question", 400), ({"question": "  "}, "question", 400),
             ({"question": 7}, "question", 400), ({"question": ["a"]}, "question", 400),
             ({"question": "q", "k": "3"}, "k", 400), ({"question": "q", "k": 2.5}, "k", 400),
             ({"question": "q", "k": 0}, "k", 400), ({"question": "q", "k": -1}, "k", 400),
             ({"question": "q", "k": 10 ** 6}, "k", 400), ({"question": "q", "kk": 2}, "kk", 400),
             (b"x" * 1_000_001, "body", 413)]


def bad_requests(port: int, questions: list[str], num: int, clients: int = 8) -> dict:
    """`num` bad requests (BAD_KINDS in turn), a good one after every second bad one, from `clients` threads at
    once: each bad one must be its 4xx naming its field with no stack trace, each good one answered."""
    jobs = []
    for i in range(num):
        jobs.append(("bad", BAD_KINDS[i % len(BAD_KINDS)]))
        if i % 2:
            jobs.append(("good", questions[i % len(questions)]))
    wrong, answered, refused = [], 0, 0
    lock = threading.Lock()

    def worker(c: int) -> None:
        nonlocal answered, refused
        for kind, job in jobs[c::clients]:
            try:
                if kind == "good":
                    status, body = http_json(port, "POST", "/v1/answer", {"question": job})
                    ok = status == 200 and isinstance(body.get("answer"), str)
                else:
                    payload, field, want = job
                    status, body = http_json(port, "POST", "/v1/answer", payload)
                    ok = (status == want and body.get("field") == field and "Traceback" not in body.get("error", "")
                          and f"field '{field}'" in body.get("error", ""))
            except (OSError, http.client.HTTPException, ValueError) as e:
                status, body, ok = None, f"{type(e).__name__}: {e}", False
            with lock:
                if not ok:
                    wrong.append(f"{kind} {str(job)[:60]}: {status} {str(body)[:200]}")
                elif kind == "good":
                    answered += 1
                else:
                    refused += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    goods = sum(kind == "good" for kind, _ in jobs)
    if wrong:
        raise SystemExit(f"bad requests: {len(wrong)} handled wrongly, first: {wrong[0]}")
    return {"mode": f"{num} bad requests ({len(BAD_KINDS)} kinds) + {goods} good, interleaved", "clients": clients,
            "seconds": wall, "requests": len(jobs), "errors": 0,
            "bad": f"{refused}/{num} refused with a 4xx naming the field", "good": f"{answered}/{goods} answered"}


def kill_reader(svc, questions: list[str], clients: int, seconds: float) -> dict:
    """SIGKILL the reader replica (its PID from /v1/health) a third of the way into `clients` x `seconds` of
    load: every response must be the answer this version gave before the kill, or a 503; recovery time is from
    the kill to the first answer completed after it (every request waits for the replacement meanwhile)."""
    asked = questions[:max(clients * 2, 16)]
    before = {q: svc.post("/v1/answer", {"question": q})[1]["answer"] for q in asked}
    pid = svc.get("/v1/health")[1]["replica_pid"]
    events: list[tuple[float, int, bool]] = []  # (completed at, status, right answer)
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=180)
        i = c
        while time.monotonic() < stop_at:
            q = asked[i % len(asked)]
            i += clients
            try:
                status, body = http_json(svc.port, "POST", "/v1/answer", {"question": q}, conn=conn)
                right = status == 200 and body["answer"] == before[q]
            except (OSError, http.client.HTTPException, ValueError):
                status, right = -1, False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=180)
            with lock:
                events.append((time.monotonic(), status, right))
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds / 3)
    killed_at = time.monotonic()
    os.kill(pid, 9)
    for t in threads:
        t.join()
    after = [e for e in events if e[0] > killed_at]
    ok = [e for e in after if e[1] == 200]
    wrong = sum(1 for e in events if e[1] == 200 and not e[2])
    unavailable = sum(1 for e in events if e[1] == 503)
    other = sum(1 for e in events if e[1] not in (200, 503))
    new_pid = svc.get("/v1/health")[1]["replica_pid"]
    recovery = (ok[0][0] - killed_at) if ok else None
    if wrong or other or new_pid == pid or not ok:
        raise SystemExit(f"kill: {wrong} wrong answers, {other} other failures, replaced: {new_pid != pid}, "
                         f"answers after the kill: {len(ok)}")
    return {"mode": "reader replica killed (SIGKILL by PID) under load", "clients": clients,
            "seconds": seconds, "requests": len(events), "errors": unavailable + other,
            "kill": f"replaced (pid {pid} -> {new_pid}); recovery {recovery:.1f} s; {len(ok)} answered after "
                    f"the kill, 0 wrong, {unavailable} 503"}


def batch_curve(src: Path, work: Path, questions: list[str], extra: list[str], seconds: float = 3.0) -> list[dict]:
    """`QAService.answer` (what a reader replica runs per batch) in this process at batch 1, 2, ..., 32: the
    most batching can gain on this hardware, with no HTTP, proxy or queueing in the way."""
    from cluster.config import load_config
    from trainer.qa_service import QAService
    from trainer.serve_requests import QARequest

    run_dir = work / "run-curve"
    shutil.copytree(src, run_dir)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *extra], "serve")
    service = QAService(cfg, cfg.serve.max_k)
    rows, base = [], None
    for size in (1, 2, 4, 8, 16, 32):
        batch = [QARequest(q, None) for q in (questions * size)[:size]]
        service.answer(batch)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            service.answer(batch)
            n += 1
        per_batch = (time.perf_counter() - t0) / n
        base = base or size / per_batch
        rows.append({"mode": f"in-process answer, batch {size}", "clients": 1, "requests": n * size,
                     "req/s": size / per_batch, "p50 ms": per_batch * 1e3, "mean batch": size,
                     "batch gain": size / per_batch / base})
    return rows


def _delta(h: dict, base: dict) -> dict:
    return {"answered": h["answered"] - base["answered"], "batches": h["batches"] - base["batches"]}


def _added_people(num: int) -> dict:
    from indexer.synthetic import new_people

    return new_people(num, seed=20_261, id_prefix="served")  # ids no run has; names drawn apart from its seeds


def _check_swap(svc, r: dict, added: dict) -> dict:
    """The update-corpus during the load: committed, every client's versions non-decreasing, the service on
    the new version afterwards, and how many of the added people's questions it answers right."""
    side = r["side"]
    if "failed" in side:
        raise SystemExit(f"update-corpus failed during the load:\n{side['failed']}")
    new_version = side["summary"]["index_version"]
    monotone = all(v == sorted(v) for v in r["versions"])
    for _ in range(600):  # a load may still be finishing when the clients stop
        if svc.get("/v1/health")[1]["index_version"] == new_version:
            break
        time.sleep(0.1)
    served_new = sum(v.count(new_version) for v in r["versions"])
    right = 0
    for qa in added["qa"]:
        status, body = svc.post("/v1/answer", {"question": qa["question"]})
        if status != 200 or body["index_version"] != new_version:
            raise SystemExit(f"after the swap: {status} {body}")
        right += _norm(body["answer"]) in {_norm(x) for x in qa["answers"]}
    if r["errors"] or not monotone or not served_new:
        raise SystemExit(f"update-corpus under load: {len(r['errors'])} failed requests, versions non-decreasing: "
                         f"{monotone}, answers from the new version: {served_new}")
    return {"swap": f"v{side['summary'].get('index_version')} committed; {served_new} answers from it; versions "
                    f"non-decreasing: {'yes' if monotone else 'no'}",
            "added EM": f"{right}/{len(added['qa'])}"}


if __name__ == "__main__":
    main()
