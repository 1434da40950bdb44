"""Prometheus metrics and a health check over HTTP for long-running jobs.

``serve_http(port, health)`` starts a daemon thread answering

- ``GET /metrics``: the Prometheus exposition of the default registry;
- ``GET /healthz``: 200 and a JSON body when healthy, 503 with the reasons when
  not (the consumer has not polled within its interval, or the broker was
  unreachable at the last attempt).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)


class Health:
    """Liveness facts a job reports as it runs; thread-safe enough for flags and timestamps."""

    def __init__(self, job: str, poll_interval_s: float = 60.0):
        self.job = job
        self.poll_interval_s = poll_interval_s
        self.started = time.monotonic()
        self.last_poll = time.monotonic()
        self.broker_ok = True
        self.broker_error: str | None = None
        self.facts: dict[str, object] = {}

    def polled(self) -> None:
        self.last_poll = time.monotonic()

    def broker(self, ok: bool, error: str | None = None) -> None:
        self.broker_ok, self.broker_error = ok, (None if ok else error)

    def status(self) -> tuple[bool, dict[str, object]]:
        since_poll = time.monotonic() - self.last_poll
        problems = []
        if since_poll > self.poll_interval_s:
            problems.append(f"consumer has not polled for {since_poll:.0f}s (limit {self.poll_interval_s:g}s)")
        if not self.broker_ok:
            problems.append(f"broker unreachable: {self.broker_error}")
        body = {
            "job": self.job,
            "healthy": not problems,
            "problems": problems,
            "seconds_since_poll": round(since_poll, 3),
            "uptime_s": round(time.monotonic() - self.started, 1),
            **self.facts,
        }
        return not problems, body


def serve_http(port: int, health: Health, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on ``port`` (0 picks one; see ``server.server_port``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith("/metrics"):
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif self.path.startswith("/healthz"):
                ok, body = health.status()
                self._send(200 if ok else 503, json.dumps(body, default=str).encode(), "application/json")
            else:
                self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            pass  # scrapes every few seconds would flood the job's log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics and /healthz", host, server.server_port)
    return server
