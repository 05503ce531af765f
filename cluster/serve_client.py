"""`launch.py serve` as a child process on a free loopback port, and a small JSON client for it: how the
HTTP tests, the browser test and bench/serve_load.py start the real service (no Ray imported here).

    with serving([f"run_dir={run}"]) as svc:      # returns once the service printed its ready line
        status, body = svc.post("/v1/answer", {"question": "..."})
    assert svc.rc == 0                             # SIGTERM on leaving the block: a clean stop
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def http_json(port: int, method: str, path: str, body=None, headers=None, timeout: float = 120,
              conn: http.client.HTTPConnection | None = None) -> tuple[int, object]:
    """(status, parsed JSON body) of one request to 127.0.0.1:`port`; bodies given as bytes are sent as they
    are, anything else as JSON. `conn`: a kept-alive connection to reuse (else a new one, closed after)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        if own:
            conn.close()


class Service:
    """A running `launch.py serve`: its port, the JSON line it printed when ready, its process and stderr."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.ready: dict = {}
        self.stderr: list[str] = []
        self.rc: int | None = None
        self.url = f"http://127.0.0.1:{port}/"

    def get(self, path: str) -> tuple[int, object]:
        return http_json(self.port, "GET", path)

    def post(self, path: str, body) -> tuple[int, object]:
        return http_json(self.port, "POST", path, body)

    def log_tail(self, chars: int = 3000) -> str:
        return "".join(self.stderr)[-chars:]


@contextlib.contextmanager
def serving(overrides: list[str], port: int | None = None, env: dict | None = None,
            stop_timeout: float = 120) -> Iterator[Service]:
    """Start `launch.py serve` with `overrides` on `port` (a free one by default) and wait for its ready line;
    on leaving, SIGTERM it and wait (its exit status in `Service.rc`). Raises RuntimeError if it exits first."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "serve", *overrides, f"serve.port={port}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    svc = Service(proc, port)
    threading.Thread(target=lambda: svc.stderr.extend(proc.stderr), daemon=True).start()
    try:
        line = proc.stdout.readline()  # one JSON line once the application answers
        if not line:
            proc.wait(timeout=stop_timeout)
            raise RuntimeError(f"serve exited ({proc.returncode}) before answering: {svc.log_tail()}")
        svc.ready = json.loads(line)
        yield svc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        svc.rc = proc.wait(timeout=stop_timeout)
