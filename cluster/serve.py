"""`launch.py serve`: the run's QA model as an HTTP service on Ray Serve.

    POST /v1/answer   {"question": str, "k": int (optional)} -> answer, probability, evidence, blocks, versions
    POST /v1/explain  the same request -> `launch.py explain`'s explanation (shares, leave-one-out)
    GET  /v1/health   -> {"status", "index_version", "store_version", "model", "retrieval_mode", "loading",
                          "answered", "batches", "largest_batch", "replica_pid", "retried"}
    GET  /            the web page (cluster/static/: a question box, the answer in its evidence, share bars)

Everything a request means lives in plain Python (trainer/serve_requests.py checks it, trainer/qa_service.py
answers it and swaps corpus versions, trainer/request_batcher.py batches it); this module is the Ray Serve
edge, two deployments:

- `QAIngress` (one replica, no CPU reserved): the routes, the page, request checks, and the calls to the
  readers; a reader that dies under a request is retried on its replacement (or another replica) for up
  to `serve.unavailable_s`, then the client gets 503 with Retry-After, never a wrong answer.
- `QAReader` (`serve.replicas` replicas, `serve.replica_cpus`/`gpus` each): a `QAService` (model + index).
  Concurrent answers meet in a `Batcher`, which takes everything queued (up to `serve.max_batch_size`)
  each time the model is free, so batches grow with the load; a lone request waits at most
  `serve.batch_wait_s` (default 0). The model runs in a worker thread: the replica keeps accepting requests meanwhile.

Errors are JSON with a 4xx status naming the field (`BadRequest`); anything unexpected is logged here with its
stack and the client gets `{"error": "internal error"}` with 500, never a stack trace. The HTTP proxy binds
`serve.host` (127.0.0.1 unless configured). Ray itself is started as for pre-training (cluster/run.py:
local, loopback, token auth on) or joined (`cluster.address`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import time
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.config import Config, load_config
from cluster.run import actor_env, connect
from core.errors import InputError
from trainer.qa_service import QAService
from trainer.qa_system import resolve_qa_model_dir
from trainer.request_batcher import Batcher
from trainer.run import Run, check_k
from trainer.serve_requests import MAX_BODY_BYTES, BadRequest, QARequest, check_body_size, parse_request

log = logging.getLogger(__name__)

APP_NAME = "realm-qa"
# the page's files, shipped in the package (no CDN: it works offline) and served with a policy that lets
# them load only themselves and talk only to this service
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
STATIC_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                             "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                             "frame-ancestors 'none'",
                  "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
ROUTES = {"/v1/answer": "POST", "/v1/explain": "POST", "/v1/health": "GET", **{p: "GET" for p in STATIC}}


def error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, **({"field": field} if field else {})}, status_code=status)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused (413) as soon as its declared length or what has arrived exceeds `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("body", f"bad Content-Length {declared!r}")
        check_body_size(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_body_size(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="QAReader")
class QAReader:
    """One reader replica: the QA model and its index (a `QAService`); concurrent answers meet in a
    `Batcher`, which takes whatever has queued each time the model is free."""

    def __init__(self, cfg: Config):
        from core.logs import setup_logging

        setup_logging()
        sc = cfg.serve
        self.service = QAService(cfg, sc.max_k, sc.poll_seconds)
        self.batcher = Batcher(self.service.answer, sc.max_batch_size, sc.batch_wait_s)

    async def answer(self, req: QARequest) -> dict | BadRequest:
        """The answer, or the BadRequest this version refuses it with (a k over its live blocks)."""
        self.service.poll()  # a stat, at most every serve.poll_seconds; a new version loads in the background
        return await self.batcher.submit(req)

    async def explain(self, req: QARequest) -> dict | BadRequest:
        self.service.poll()
        try:
            return await asyncio.to_thread(self.service.explain, req)
        except BadRequest as e:
            return e

    def health(self) -> dict:
        self.service.poll()
        return {**self.service.health(), "replica_pid": os.getpid()}


@serve.deployment(name="QAIngress")
class QAIngress:
    """The HTTP edge: routes, the page's files, request checks (4xx naming the field), and the calls to the
    reader replicas. A reader that dies with a request in flight (killed, out of memory) is retried on
    another or on its replacement; past `serve.unavailable_s` the client gets 503, never a wrong answer."""

    def __init__(self, reader, cfg: Config):
        from core.logs import setup_logging

        setup_logging()
        self.reader, self.max_k, self.unavailable_s = reader, cfg.serve.max_k, cfg.serve.unavailable_s
        self.static = {path: ((STATIC_DIR / name).read_bytes(), media) for path, (name, media) in STATIC.items()}
        self.retried = 0

    async def _call(self, method: str, *args):
        """`reader.method(*args)`, retried while no reader replica can take it, for up to serve.unavailable_s."""
        deadline = time.monotonic() + self.unavailable_s
        while True:
            try:
                return await getattr(self.reader, method).remote(*args)
            except READER_GONE as e:
                if time.monotonic() >= deadline:
                    raise Unavailable() from e
                self.retried += 1
                log.warning("serve: reader unavailable for %s (%s); retrying", method, type(e).__name__)
                await asyncio.sleep(0.2)

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path not in ROUTES:
            api = ", ".join(p for p in ROUTES if p.startswith("/v1/"))
            return error(404, f"no such endpoint {path!r}; endpoints: {api}")
        if method != ROUTES[path]:
            return error(405, f"{path} takes {ROUTES[path]}, not {method}")
        if path in self.static:
            content, media = self.static[path]
            return Response(content, media_type=media, headers=STATIC_HEADERS)
        try:
            if path == "/v1/health":
                return JSONResponse(await self.health())
            req = parse_request(await read_body(request), self.max_k)
            result = await self._call("answer" if path == "/v1/answer" else "explain", req)
            if isinstance(result, BadRequest):
                raise result
            return JSONResponse(result)
        except BadRequest as e:
            return error(e.status, str(e), e.field)
        except Unavailable:
            return JSONResponse({"error": f"no reader replica answered within {self.unavailable_s:g} s "
                                          "(restarting); retry"}, status_code=503, headers={"Retry-After": "1"})
        except Exception:  # ours to debug, from the replica's log; the client learns nothing of the internals
            log.exception("serve: %s %s failed", method, path)
            return error(500, "internal error")

    async def health(self) -> dict:
        return {**await self._call("health"), "retried": self.retried}


class Unavailable(Exception):
    """No reader replica took the request within serve.unavailable_s."""


# what a call to a reader raises when its replica died under it or none is up yet (Serve is starting its
# replacement): worth retrying, since answering twice is harmless
READER_GONE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError,
               BackPressureError)


def build_app(cfg: Config):
    """The Serve application for this config (what `launch.py serve` runs and `app_builder` returns): the
    ingress (no CPU reserved: it parses and forwards) in front of `serve.replicas` readers."""
    sc = cfg.serve
    reader = QAReader.options(
        num_replicas=sc.replicas, max_ongoing_requests=max(64, 4 * sc.max_batch_size),
        ray_actor_options={"num_cpus": sc.replica_cpus, "num_gpus": sc.replica_gpus,
                           "runtime_env": actor_env(cfg, sc.replica_gpus)},
    ).bind(cfg)
    return QAIngress.options(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}).bind(reader, cfg)


def app_builder(args: dict):
    """For Ray Serve's own CLI and config files (`serve run cluster.serve:app_builder config=... overrides=...`):
    `config`, a YAML config (default configs/tiny.yaml), and `overrides`, dotted keys separated by spaces."""
    path = args.get("config") or str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    return build_app(load_config(path, shlex.split(args.get("overrides", "")), "serve"))


def check_servable(cfg: Config) -> None:
    """What a replica would fail on, checked in this process first so bad input is one line (exit 2)."""
    run = Run.open(cfg)  # no block store: BlockStore's one line, "no block store here (run prepare first)"
    check_k(cfg.finetune.k, run.store, "finetune.k")
    model_dir = resolve_qa_model_dir(run.dir, cfg.eval.model)
    if not (model_dir / "manifest.json").is_file():
        raise InputError(f"{model_dir}: checkpoint not found")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_forever(cfg: Config) -> None:
    """Deploy, print one JSON line (the URL and the version served) once it answers, run until SIGINT or
    SIGTERM, then shut Serve (and a Ray this started) down."""
    check_servable(cfg)
    sc = cfg.serve
    started = connect(cfg, cpus=sc.replicas * sc.replica_cpus, gpus=sc.replicas * sc.replica_gpus)
    # after ray.init, whose own SIGTERM handler aborts the process; SIGINT too: a shell starts background
    # jobs with it ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        serve.start(http_options={"host": sc.host, "port": sc.port})
        handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        health = handle.health.remote().result()
        print(json.dumps({"url": f"http://{sc.host}:{sc.port}/", **health}), flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("serve: interrupted, shutting down")
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
