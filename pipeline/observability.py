"""Prometheus metrics and a health check over HTTP for long-running jobs.

``serve_http(port, health)`` starts a daemon thread answering

- ``GET /metrics``: the Prometheus exposition of the default registry;
- ``GET /healthz``: 200 and a JSON body when healthy, 503 with the reasons when
  not (the consumer has not polled within its interval, or the broker was
  unreachable at the last attempt).

Also here, shared by the jobs: :class:`BrokerProbe` (a thread that checks the
bootstrap servers answer TCP connections and reports it to :class:`Health`),
:class:`LagTracker` (consumer lag per partition from the fetch responses'
high-water marks) and :func:`exit_after` (the hard deadline of a graceful
shutdown).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, generate_latest

log = logging.getLogger(__name__)

# Writes to the history store that its fence refused (pipeline/store.py): this process had lost the
# partition to another, e.g. after a pause past the session timeout. Ingest's and the forecast job's.
FENCED_WRITES = Counter("rollcast_fenced_writes_total",
                        "History store writes refused because another process owns the partition now")
TOPIC_INCARNATIONS = Counter(
    "rollcast_topic_incarnation_changes_total",
    "Partitions whose progress record or saved state counted offsets of an earlier incarnation of the topic "
    "(deleted and created again, or a new broker), started afresh (kafka.on_new_topic)", ["topic"])


class Health:
    """Liveness facts a job reports as it runs; thread-safe enough for flags and timestamps."""

    def __init__(self, job: str, poll_interval_s: float = 60.0):
        self.job = job
        self.poll_interval_s = poll_interval_s
        self.started = time.monotonic()
        self.last_poll = time.monotonic()
        self.broker_ok = True
        self.broker_error: str | None = None
        self.broker_down_since: float | None = None
        self.facts: dict[str, object] = {}

    def polled(self) -> None:
        self.last_poll = time.monotonic()

    def broker(self, ok: bool, error: str | None = None) -> None:
        """Record whether the broker answered; log one line when that changes, not one per attempt."""
        was_ok = self.broker_ok
        self.broker_ok, self.broker_error = ok, (None if ok else error)
        if was_ok and not ok:
            self.broker_down_since = time.monotonic()
            log.warning("broker unreachable: %s; %s keeps retrying and reports it on /healthz", error, self.job)
        elif ok and not was_ok:
            down = time.monotonic() - (self.broker_down_since or time.monotonic())
            self.broker_down_since = None
            log.info("broker reachable again after %.1fs", down)

    def status(self) -> tuple[bool, dict[str, object]]:
        since_poll = time.monotonic() - self.last_poll
        problems = []
        if since_poll > self.poll_interval_s:
            problems.append(f"consumer has not polled for {since_poll:.0f}s (limit {self.poll_interval_s:g}s)")
        if not self.broker_ok:
            down = time.monotonic() - (self.broker_down_since or time.monotonic())
            problems.append(f"broker unreachable for {down:.0f}s: {self.broker_error}")
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


class BrokerProbe:
    """Checks every ``interval_s`` that some bootstrap server accepts a TCP connection.

    kafka-python reconnects by itself and says little while it does; this gives
    /healthz (and one log line per outage, through :meth:`Health.broker`) an
    answer that does not depend on what the job's loop happens to be doing.
    """

    def __init__(self, health: Health, bootstrap_servers: str, interval_s: float = 2.0, timeout_s: float = 1.0):
        self.health = health
        self.addresses = [_host_port(a) for a in bootstrap_servers.split(",") if a.strip()]
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()

    def check(self) -> tuple[bool, str | None]:
        errors = []
        for host, port in self.addresses:
            try:
                with socket.create_connection((host, port), timeout=self.timeout_s):
                    return True, None
            except OSError as e:
                errors.append(f"{host}:{port} ({e.strerror or e})")
        return False, "no bootstrap server accepts connections: " + ", ".join(errors)

    def start(self) -> BrokerProbe:
        threading.Thread(target=self._run, name="broker-probe", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.health.broker(*self.check())
            self._stop.wait(self.interval_s)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]") or "localhost", int(port)


class LagTracker:
    """Consumer lag per assigned partition: the high-water mark of the last fetch response minus the
    consumer's position (kafka-python's ``highwater()``; no extra request, no ``end_offsets``)."""

    def __init__(self, gauge: Gauge):
        self.gauge = gauge
        self.partitions: set[int] = set()

    def update(self, consumer: object, batch: Mapping[object, list] | None = None) -> None:
        assigned = consumer.assignment()
        seen = set()
        for tp in assigned:
            hw = consumer.highwater(tp)
            records = (batch or {}).get(tp)
            if records:
                position = records[-1].offset + 1
            else:
                try:
                    position = consumer.position(tp, timeout_ms=0)
                except Exception:  # noqa: BLE001 - position unknown yet (no fetch answered): no figure
                    position = None
            if hw is None or position is None:
                continue
            self.gauge.labels(partition=str(tp.partition)).set(max(0, hw - position))
            seen.add(tp.partition)
        for gone in self.partitions - {tp.partition for tp in assigned}:
            self.gauge.remove(str(gone))
        self.partitions = (self.partitions | seen) & {tp.partition for tp in assigned}


def exit_after(timeout_s: float, job: str, code: int = 1) -> threading.Timer:
    """Start the hard deadline of a graceful shutdown (call it from the SIGTERM handler).

    If the process is still running ``timeout_s`` later (a checkpoint waiting on a broker
    that is down, say) it exits with ``code`` at once: offsets are committed only after
    what they cover is durable, so a restart redoes whatever was not finished.
    """

    def _expire() -> None:
        log.error("%s did not shut down within observability.shutdown_timeout_s=%gs; exiting now "
                  "without a final checkpoint (a restart redoes the unfinished work)", job, timeout_s)
        logging.shutdown()
        os._exit(code)

    timer = threading.Timer(timeout_s, _expire)
    timer.daemon = True
    timer.start()
    return timer
