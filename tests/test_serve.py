"""The Open-QA service: requests are checked field by field, answers and explanations come from the code
`query` and `explain` run, a committed corpus edit is served after one swap (each answer from one version),
and the real Ray Serve application answers over loopback HTTP with JSON errors for bad requests."""
import json
import os
import shutil
import signal
import time

import pytest

from cluster.config import load_config
from tests.conftest import ROOT, small_qa_run, write_jsonl
from trainer.serve_requests import MAX_BODY_BYTES, BadRequest, QARequest, parse_request

LENGTHS = ["model.query_max_len=32", "model.reader_max_len=96", "threads=2"]  # the tiny model's


# ---- request validation (no model) -------------------------------------------------------------------
@pytest.mark.parametrize("body,field,status,words", [
    (b"{not json", "body", 400, "not valid JSON"),
    (b"\xff\xfe", "body", 400, "UTF-8"),
    (b"[1, 2]", "body", 400, "expected a JSON object, got array"),
    (b"{}", "question", 400, "missing"),
    (b'{"question": ""}', "question", 400, "empty"),
    (b'{"question": "   "}', "question", 400, "empty"),
    (b'{"question": 5}', "question", 400, "must be a string, got integer"),
    (b'{"question": ["a"]}', "question", 400, "must be a string, got array"),
    (b'{"question": "q", "k": 0}', "k", 400, "between 1 and 8, got 0"),
    (b'{"question": "q", "k": -3}', "k", 400, "between 1 and 8, got -3"),
    (b'{"question": "q", "k": 9}', "k", 400, "between 1 and 8, got 9"),
    (b'{"question": "q", "k": "3"}', "k", 400, "must be an integer, got string"),
    (b'{"question": "q", "k": 2.5}', "k", 400, "must be an integer, got number"),
    (b'{"question": "q", "k": true}', "k", 400, "must be an integer, got boolean"),
    (b'{"question": "q", "kk": 2}', "kk", 400, "unknown field"),
    (json.dumps({"question": "x" * MAX_BODY_BYTES}).encode(), "body", 413, "over the limit"),
])
def test_a_bad_request_names_its_field(body, field, status, words):
    with pytest.raises(BadRequest) as err:
        parse_request(body, max_k=8)
    assert err.value.field == field and err.value.status == status
    assert str(err.value).startswith(f"field '{field}': ") and words in str(err.value)


def test_a_good_request_parses():
    assert parse_request(b'{"question": " Who? "}', 8) == QARequest("Who?", None)
    assert parse_request('{"question": "Wo wohnt Zoë?", "k": 8}'.encode(), 8) == QARequest("Wo wohnt Zoë?", 8)


# ---- the service core on a small trained run ---------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    small = small_qa_run(tmp_path_factory.mktemp("serve"))
    data = small["data"]
    return {"run": small["run"], "cfg": small["cfg"], "data": data,
            "corpus": [json.loads(line) for line in open(data["corpus"])],
            "questions": [json.loads(line)["question"] for line in open(data["qa_eval"])][:6]}


@pytest.fixture
def run_dir(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained["run"], dst)
    return dst


def serve_cfg(run_dir, *overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *LENGTHS, *overrides], "serve")


def service_for(run_dir, *overrides):
    from trainer.qa_service import QAService

    cfg = serve_cfg(run_dir, *overrides)
    return QAService(cfg, cfg.serve.max_k, poll_seconds=0.0)


def test_answers_are_querys_answers_with_their_blocks_and_version(trained, run_dir):
    from trainer.qa_system import load_qa_system

    service = service_for(run_dir, "finetune.k=3")
    qs = trained["questions"]
    got = service.answer([QARequest(q, None) for q in qs[:3]] + [QARequest(qs[3], 2)])
    cfg = serve_cfg(run_dir)
    system = load_qa_system(cfg, "auto")
    system.model.eval()
    want = system.predict(qs[:3], 3, cfg.finetune.max_answer_len) + system.predict([qs[3]], 2,
                                                                                   cfg.finetune.max_answer_len)
    store = system.run.store
    for a, p in zip(got, want):
        assert a["answer"] == p["prediction"] and a["probability"] == pytest.approx(p["probability"], rel=1e-5)
        assert [b["block_id"] for b in a["blocks"]] == p["top_k"]
        assert a["evidence"] == {"block_id": p["block_id"], "char_span": p["char_span"]}
        evidence = next(b for b in a["blocks"] if b["block_id"] == p["block_id"])
        s, e = a["evidence"]["char_span"]
        assert evidence["text"][s:e] == a["answer"] and evidence["text"] == store.text(p["block_id"])
        assert all(set(b) == {"block_id", "doc_id", "title", "text", "p_z", "share"} for b in a["blocks"])
        assert sum(b["p_z"] for b in a["blocks"]) == pytest.approx(1.0, abs=1e-4)
        assert sum(b["share"] for b in a["blocks"]) == pytest.approx(1.0, abs=1e-4)
        assert a["index_version"] == system.index.version and a["store_version"] == 0 and a["model"] == "models/qa"
    assert [len(a["blocks"]) for a in got] == [3, 3, 3, 2]
    assert service.health() == {"status": "ok", "index_version": system.index.version, "store_version": 0,
                                "model": "models/qa", "retrieval_mode": "dense", "loading": False, "answered": 4,
                                "batches": 1, "largest_batch": 4}


def test_explain_is_explains_output_with_its_version(trained, run_dir):
    from trainer.explain import explain

    service = service_for(run_dir, "finetune.k=3")
    q = trained["questions"][0]
    got = service.explain(QARequest(q, None))
    want = explain(load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir}", *LENGTHS, "finetune.k=3",
                                                                f"question={q}"], "explain"))
    assert got["prediction"] == got["answer"] == want["prediction"]
    assert [(r["block_id"], r["without"]["prediction"]) for r in got["blocks"]] == \
        [(r["block_id"], r["without"]["prediction"]) for r in want["blocks"]]
    assert [r["share"] for r in got["blocks"]] == pytest.approx([r["share"] for r in want["blocks"]], rel=1e-5)
    assert got["index_version"] == service.current.index_version and got["k"] == 3


def test_a_k_over_the_live_blocks_is_refused_in_its_place(run_dir):
    service = service_for(run_dir, "serve.max_k=100000")
    live = service.current.system.run.store.num_live
    good, bad = service.answer([QARequest("Who?", 2), QARequest("Who?", live + 1)])
    assert good["k"] == 2 and isinstance(bad, BadRequest) and bad.field == "k" and f"between 1 and {live}" in str(bad)
    with pytest.raises(BadRequest, match="field 'k'"):
        service.explain(QARequest("Who?", live + 1))


def test_an_update_corpus_is_served_after_one_swap(trained, run_dir, tmp_path):
    """Every old document deleted and one added: after the swap the only possible evidence is the new
    document, so an answer from it (and its version) shows the service reads the new pair whole."""
    from trainer.corpus_edits import update_corpus

    service = service_for(run_dir, "finetune.k=1")
    question = "Where was Mira Tolk born?"
    before = service.answer([QARequest(question, None)])[0]
    old_docs = {d["id"] for d in trained["corpus"]}
    assert before["blocks"][0]["doc_id"] in old_docs
    assert not service.poll(wait=True)  # nothing committed: no load

    changes = write_jsonl(tmp_path / "c.jsonl", [{"id": d, "delete": True} for d in sorted(old_docs)]
                          + [{"id": "fresh", "title": "Mira Tolk", "text": "Mira Tolk was born in Ostend in 1950."}])
    summary = update_corpus(load_config(ROOT / "configs" / "tiny.yaml",
                                        [f"run_dir={run_dir}", "threads=2", f"changes={changes}"], "update-corpus"))
    # committed but not yet polled: still the old version, wholly (its blocks, its numbers)
    still = service.answer([QARequest(question, None)])[0]
    assert still == before

    assert service.poll(wait=True) and service.swaps == 1
    after = service.answer([QARequest(question, None)])[0]
    assert (after["index_version"], after["store_version"]) == (summary["index_version"], 1)
    assert after["index_version"] > before["index_version"]
    assert [b["doc_id"] for b in after["blocks"]] == ["fresh"]
    assert after["evidence"]["block_id"] == after["blocks"][0]["block_id"]
    assert after["answer"] and after["answer"] in "Mira Tolk was born in Ostend in 1950."
    assert service.health()["index_version"] == summary["index_version"]
    assert not service.poll(wait=True)  # the same pointer again: no second load


def test_a_new_fine_tuned_model_is_served_after_one_swap(trained, run_dir):
    import dataclasses

    from trainer.finetune import finetune

    service = service_for(run_dir)
    before = service.current
    assert before.system.meta["step"] == 2
    cfg = trained["cfg"]
    finetune(dataclasses.replace(cfg, run_dir=str(run_dir), seed=1,
                                 finetune=dataclasses.replace(cfg.finetune, steps=3)))
    assert service.current is before  # renamed into place, not yet polled
    assert service.poll(wait=True) and service.swaps == 1
    assert service.current.system.meta["step"] == 3 and service.current.model == "models/qa"
    assert service.current.index_version == before.index_version  # fine-tuning keeps the doc encoder and index


def test_a_version_that_fails_to_load_keeps_the_old_one(run_dir):
    service = service_for(run_dir)
    before = service.current
    (run_dir / "CORPUS").write_text('{"store": "store/v0099", "index": "v0099"}')  # names no complete store
    assert service.poll(wait=True)
    assert service.current is before and service.swaps == 0
    assert not service.poll(wait=True)  # the same broken pointer is not loaded again and again
    assert service.answer([QARequest("Who?", None)])[0]["index_version"] == before.index_version
    shutil.rmtree(run_dir / "models")  # even the model gone: the loaded version goes on answering
    assert service.poll(wait=True) and service.current is before
    assert service.answer([QARequest("Who?", None)])[0]["index_version"] == before.index_version


# ---- the real Ray Serve application over loopback HTTP ------------------------------------------------
def _http(port, method, path, body=None, headers=None):
    from cluster.serve_client import http_json

    return http_json(port, method, path, body, headers)


def _get_page(port, path):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


# about a minute on 2 cores (Ray, Serve's controller and proxy, a replica loading torch): in the default run, so
# CI exercises the real Serve application
def test_the_ray_serve_app_answers_and_refuses_over_http(trained, run_dir, tmp_path):
    """`launch.py serve` on a free loopback port: health, the web page's files, answers (concurrent ones
    batched), an explanation, every kind of bad request a 4xx JSON error naming the field (no stack trace),
    an update-corpus served after the swap, a killed reader replica replaced with no wrong answer, only
    127.0.0.1 listening on the port, a clean stop on SIGTERM."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from cluster.serve_client import serving

    with serving([f"run_dir={run_dir}", *LENGTHS, "finetune.k=3", "serve.poll_seconds=0.2"]) as svc:
        port, ready = svc.port, svc.ready
        assert ready["url"] == f"http://127.0.0.1:{port}/" and ready["status"] == "ok"
        listening = {c.laddr.ip for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}

        status, health = _http(port, "GET", "/v1/health")
        assert status == 200 and health["index_version"] == ready["index_version"] and health["model"] == "models/qa"
        status, headers, page = _get_page(port, "/")  # the web page and its files: shipped, nothing from elsewhere
        assert status == 200 and headers["content-type"].startswith("text/html") and 'id="question"' in page
        assert "script-src 'self'" in headers["content-security-policy"] and "http" not in page
        for asset, kind in (("/app.js", "text/javascript"), ("/app.css", "text/css")):
            status, headers, text = _get_page(port, asset)
            assert status == 200 and headers["content-type"].startswith(kind) and text.strip()
        assert "/v1/answer" in _get_page(port, "/app.js")[2]

        qs = trained["questions"]
        with ThreadPoolExecutor(8) as pool:  # concurrent requests share batches; each gets its own answer
            answers = list(pool.map(lambda q: _http(port, "POST", "/v1/answer", {"question": q}), qs * 2))
        assert all(s == 200 for s, _ in answers)
        assert [a["question"] for _, a in answers] == qs * 2
        assert [a["answer"] for _, a in answers[:len(qs)]] == [a["answer"] for _, a in answers[len(qs):]]
        assert all(len(a["blocks"]) == 3 and a["index_version"] == ready["index_version"] for _, a in answers)
        counts = _http(port, "GET", "/v1/health")[1]
        assert counts["answered"] == 2 * len(qs) and counts["batches"] < counts["answered"]  # batched
        status, one = _http(port, "POST", "/v1/answer", {"question": qs[0], "k": 2})
        assert status == 200 and len(one["blocks"]) == 2
        status, why = _http(port, "POST", "/v1/explain", {"question": qs[0]})
        assert status == 200 and why["answer"] == answers[0][1]["answer"] and len(why["blocks"]) == 3
        assert all("without" in r and "share" in r for r in why["blocks"])

        bad = [("POST", "/v1/answer", b"{oops", "body", 400), ("POST", "/v1/answer", {}, "question", 400),
               ("POST", "/v1/answer", {"question": ""}, "question", 400),
               ("POST", "/v1/answer", {"question": 7}, "question", 400),
               ("POST", "/v1/answer", {"question": "q", "k": 0}, "k", 400),
               ("POST", "/v1/answer", {"question": "q", "k": 10**6}, "k", 400),
               ("POST", "/v1/explain", {"question": "q", "k": "2"}, "k", 400),
               ("POST", "/v1/answer", b"x" * (MAX_BODY_BYTES + 1), "body", 413),
               ("GET", "/v1/answer", None, None, 405), ("POST", "/v1/health", None, None, 405),
               ("GET", "/nope", None, None, 404)]
        for method, path, body, field, want in bad:
            status, err = _http(port, method, path, body)
            assert status == want and set(err) <= {"error", "field"} and err.get("field") == field, (path, body, err)
            assert "Traceback" not in err["error"] and "File \"" not in err["error"]
        assert _http(port, "POST", "/v1/answer", {"question": qs[0]})[1]["answer"] == answers[0][1]["answer"]

        from trainer.corpus_edits import update_corpus

        changes = write_jsonl(tmp_path / "c.jsonl", [{"id": "fresh", "title": "Mira Tolk",
                                                      "text": "Mira Tolk was born in Ostend in 1950."}])
        summary = update_corpus(load_config(ROOT / "configs" / "tiny.yaml",
                                            [f"run_dir={run_dir}", "threads=2", f"changes={changes}"], "update-corpus"))
        versions = []
        for _ in range(600):  # answers keep coming while the new pair loads; the version only moves forward
            status, a = _http(port, "POST", "/v1/answer", {"question": "Where was Mira Tolk born?"})
            assert status == 200
            versions.append(a["index_version"])
            if a["index_version"] == summary["index_version"]:
                break
        assert versions[-1] == summary["index_version"] and versions == sorted(versions)
        assert a["store_version"] == 1
        assert _http(port, "GET", "/v1/health")[1]["index_version"] == summary["index_version"]

        # the reader replica killed by its PID with requests in flight: Serve starts another, the ingress
        # retries on it; every request is answered right (or gets 503), none is answered wrong
        want = _http(port, "POST", "/v1/answer", {"question": qs[1]})[1]["answer"]
        pid = _http(port, "GET", "/v1/health")[1]["replica_pid"]
        with ThreadPoolExecutor(4) as pool:
            flying = [pool.submit(_http, port, "POST", "/v1/answer", {"question": qs[1]}) for _ in range(4)]
            time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            after = [_http(port, "POST", "/v1/answer", {"question": qs[1]}) for _ in range(3)]
            results = [f.result() for f in flying] + after
        for status, body in results:
            assert (status == 200 and body["answer"] == want) or (status == 503 and "retry" in body["error"]), body
        assert after[-1][0] == 200
        health = _http(port, "GET", "/v1/health")[1]
        assert health["replica_pid"] != pid and health["index_version"] == summary["index_version"]
    assert svc.rc == 0, svc.log_tail()  # a clean stop on SIGTERM


def test_serving_reads_only_the_keys_its_table_names(trained, run_dir):
    """What the `serve` command's driver and a replica read of the config (its Ray start aside: connect reads
    cluster.address, host and dashboard) is in COMMAND_KEYS["serve"], so an override it ignores is refused."""
    from cluster.config import COMMAND_KEYS, reads
    from cluster.serve import build_app, check_servable
    from tests.test_command_keys import ReadRecorder
    from trainer.qa_service import QAService

    cfg = serve_cfg(run_dir)
    recorder = ReadRecorder()
    recorder.watch(cfg)
    with recorder:
        check_servable(cfg)
        build_app(cfg)
        service = QAService(cfg, cfg.serve.max_k, cfg.serve.poll_seconds)
        service.answer([QARequest(trained["questions"][0], None)])
        service.explain(QARequest(trained["questions"][0], 2))
        service.poll(wait=True)
    assert "serve.max_k" in recorder.reads and "finetune.k" in recorder.reads
    assert sorted(k for k in recorder.reads if not reads("serve", k)) == []
    assert "serve." in COMMAND_KEYS["serve"]


def test_serve_refuses_bad_settings_and_a_run_without_a_model_in_one_line(tmp_path, capsys):
    import launch

    for override, words in [("serve.port=0", "'serve.port': must be a TCP port"),
                            ("serve.replicas=0", "'serve.replicas': must be positive"),
                            ("serve.batch_wait_s=-1", "'serve.batch_wait_s': must not be negative"),
                            ("pretrain.steps=3", "'pretrain.steps' is not read by 'serve'")]:
        assert launch.main(["serve", f"run_dir={tmp_path / 'run'}", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert launch.main(["serve", f"run_dir={tmp_path / 'run'}"]) == 2  # before Ray starts: nothing to serve
    assert "no block store here" in capsys.readouterr().err


# ---- the web page in a real headless browser ----------------------------------------------------------
def _chromium() -> str:
    """Debian's chromium (or $REALM_CHROMIUM): a missing browser fails the test, it does not skip it."""
    import os

    path = os.environ.get("REALM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium for the browser test: `apt-get install -y chromium` (.ci/run does) "
                    "or set REALM_CHROMIUM to a Chromium binary")
    return path


def test_the_web_page_answers_a_question_in_a_headless_browser(trained, run_dir):
    """The page at / in headless Chromium (Playwright, the system browser): type a question, submit, and the
    answer, its evidence block with the answer highlighted, the top-k share bars and the index version show.
    REALM_SCREENSHOT=docs/serve_page.png saves the page as it looks then (README, "Serving")."""
    import os

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("no Playwright for the browser test: `pip install -e .[dev]` (.ci/run does)")
    from cluster.serve_client import serving

    chromium = _chromium()
    question = trained["questions"][0]
    with serving([f"run_dir={run_dir}", *LENGTHS, "finetune.k=3"]) as svc:
        status, want = svc.post("/v1/answer", {"question": question})
        assert status == 200 and want["evidence"] is not None
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            try:
                page = browser.new_page(viewport={"width": 900, "height": 760})
                failed = []
                page.on("requestfailed", lambda r: failed.append(r.url))
                page.goto(svc.url)
                # a selector, not wait_for_function: its polling evaluates a string, which the page's CSP refuses
                page.wait_for_selector("#version:has-text('model')", timeout=60_000)
                assert f"index version: {want['index_version']}" in page.inner_text("#version")  # from /v1/health
                assert page.is_hidden("#result")
                page.fill("#question", question)
                page.click("#submit")
                page.wait_for_selector("#result", state="visible", timeout=60_000)
                assert page.is_hidden("#error")
                assert page.inner_text("#answer") == want["answer"]
                assert page.inner_text("#answer-version") == str(want["index_version"])
                evidence = next(b for b in want["blocks"] if b["block_id"] == want["evidence"]["block_id"])
                s, e = want["evidence"]["char_span"]
                assert page.text_content("#evidence") == evidence["text"]
                assert page.inner_text("#evidence mark") == evidence["text"][s:e] == want["answer"]
                items = page.query_selector_all("#blocks li")
                assert [int(li.get_attribute("data-block-id")) for li in items] == \
                    [b["block_id"] for b in want["blocks"]]
                widths = page.eval_on_selector_all("#blocks .bar > div", "els => els.map(e => e.style.width)")
                assert [float(w.rstrip("%")) for w in widths] == \
                    pytest.approx([b["share"] * 100 for b in want["blocks"]], abs=1e-3)
                marked = page.eval_on_selector_all("#blocks li mark", "ms => ms.map(m => [m.closest('li')"
                                                   ".dataset.blockId, m.textContent])")
                assert marked == [[str(evidence["block_id"]), want["answer"]]]  # in its block, only there
                assert failed == []  # every asset came from the service itself
                if os.environ.get("REALM_SCREENSHOT"):
                    page.screenshot(path=os.environ["REALM_SCREENSHOT"], full_page=True)
            finally:
                browser.close()
    assert svc.rc == 0, svc.log_tail()
