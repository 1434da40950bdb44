"""Run the embedded stack on this machine until Ctrl-C or SIGTERM.

Starts, as managed child processes, the tansu Kafka-protocol broker (in-memory)
and an MLflow server (SQLite store, served artifacts under the data
directory), waits until both are healthy, creates the topics, then starts the
pipeline jobs (ingest, train, forecast) against them and restarts a job that
dies. If kafka.bootstrap_servers or mlflow.tracking_uri are configured, those
are used instead of starting a broker or MLflow server. On Ctrl-C or SIGTERM
everything is stopped, jobs first, and no child process is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jobs import stack
from pipeline.config import Settings, stack_file
from pipeline.errors import MlflowUnavailable, RollcastError
from pipeline.runtime import Shutdown, Stopped

HELP = "run the embedded stack: broker, MLflow server and the pipeline jobs"
RESOLVE_ENDPOINTS = False  # `up` decides itself whether to start a broker and MLflow

log = logging.getLogger("rollcast.up")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-jobs", action="store_true", help="start only the broker and MLflow, not the pipeline jobs"
    )


@dataclass
class Stack:
    """The running stack: endpoints, children and how to start a job."""

    settings: Settings
    config_path: str | None
    bootstrap_servers: str = ""
    tracking_uri: str = ""
    children: list[stack.Child] = field(default_factory=list)
    jobs: dict[str, stack.Child] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.settings.data_dir / "logs"

    def job_env(self) -> dict[str, str]:
        """Environment for child jobs: ours, plus the endpoints this stack uses."""
        env = dict(os.environ)
        env["ROLLCAST_KAFKA__BOOTSTRAP_SERVERS"] = self.bootstrap_servers
        env["ROLLCAST_MLFLOW__TRACKING_URI"] = self.tracking_uri
        env["ROLLCAST_DATA_DIR"] = str(self.settings.data_dir.resolve())
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def job_argv(self, name: str, *extra: str) -> list[str]:
        argv = [sys.executable, "-m", "jobs.cli"]
        if self.config_path:
            argv += ["--config", str(Path(self.config_path).resolve())]
        return [*argv, name, *extra]

    def start_job(self, name: str, *extra: str) -> stack.Child:
        child = stack.Child(name, self.job_argv(name, *extra), self.log_dir / f"{name}.log", env=self.job_env())
        child.start()
        self.children.append(child)
        self.jobs[name] = child
        return child

    def supervise(self) -> None:
        """Restart a job that exited (with a growing pause), logging where its log is."""
        for name, child in list(self.jobs.items()):
            if child.alive():
                continue
            n = self.restarts.get(name, 0) + 1
            self.restarts[name] = n
            log.error(
                "job %s exited with status %s (restart %d); last lines of %s:\n%s",
                name, child.proc.returncode, n, child.log_path, child.tail(8),
            )
            self.children.remove(child)
            time.sleep(min(30.0, 0.5 * 2**n))
            self.start_job(name)

    def stop(self) -> None:
        stack.stop_all(self.children, self.settings.embedded.stop_timeout_s)
        self.children.clear()
        self.jobs.clear()
        with contextlib.suppress(FileNotFoundError):
            stack_file(self.settings).unlink()


def start_services(settings: Settings, config_path: str | None) -> Stack:
    """Start (or find) the broker and MLflow server, create topics, record the endpoints."""
    st = Stack(settings, config_path)
    emb = settings.embedded
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if settings.kafka.bootstrap_servers:
            st.bootstrap_servers = settings.kafka.bootstrap_servers
            log.info("using the configured Kafka cluster at %s", st.bootstrap_servers)
        else:
            port = emb.broker_port or stack.free_port()
            st.children.append(
                stack.start_broker(stack.broker_binary(emb.broker_bin), port, st.log_dir, emb.start_timeout_s)
            )
            st.bootstrap_servers = f"127.0.0.1:{port}"
        if settings.mlflow.tracking_uri:
            st.tracking_uri = settings.mlflow.tracking_uri
            _check_mlflow(st.tracking_uri, settings.mlflow.connect_timeout_s)
            log.info("using the configured MLflow server at %s", st.tracking_uri)
        else:
            port = emb.mlflow_port or stack.free_port()
            st.children.append(
                stack.start_mlflow(settings.data_dir / "mlflow", port, st.log_dir, emb.start_timeout_s)
            )
            st.tracking_uri = f"http://127.0.0.1:{port}"
        resolved = settings.replace(**{"kafka.bootstrap_servers": st.bootstrap_servers})
        from pipeline.kafka.clients import ensure_topics

        ensure_topics(resolved)
        stack_file(settings).write_text(
            json.dumps(
                {"pid": os.getpid(), "bootstrap_servers": st.bootstrap_servers, "tracking_uri": st.tracking_uri}
            )
        )
    except BaseException:
        st.stop()
        raise
    return st


def _check_mlflow(uri: str, timeout_s: float) -> None:
    if not uri.startswith(("http://", "https://")):
        return  # a file or database store needs no server
    deadline = time.monotonic() + timeout_s
    while not stack.http_ok(uri.rstrip("/") + "/health"):
        if time.monotonic() > deadline:
            raise MlflowUnavailable(
                f"mlflow.tracking_uri: no MLflow server answered at {uri} within "
                f"mlflow.connect_timeout_s={timeout_s:g}s"
            )
        time.sleep(0.5)


def available_jobs(settings: Settings) -> list[str]:
    """The configured long-running jobs that this installation has."""
    from jobs.cli import COMMANDS

    return [j for j in settings.embedded.jobs if j in COMMANDS]


def print_endpoints(st: Stack) -> None:
    print("rollcast stack is up", flush=True)
    print(f"  Kafka bootstrap servers : {st.bootstrap_servers}")
    print(f"  MLflow UI               : {st.tracking_uri}")
    t = st.settings.topics
    print(f"  topics                  : {t.observations}, {t.dlq}, {t.windows}, {t.forecasts}")
    print(f"  data directory          : {st.settings.data_dir.resolve()}")
    print(f"  logs                    : {st.log_dir.resolve()}")
    if st.jobs:
        print(f"  jobs                    : {', '.join(st.jobs)}")
    print("Press Ctrl-C to stop.", flush=True)


def serve(st: Stack, until: Callable[[], bool] | None = None, poll_s: float = 1.0) -> None:
    """Supervise the jobs until Ctrl-C, SIGTERM or ``until()`` returns True."""
    while until is None or not until():
        st.supervise()
        time.sleep(poll_s)


def run(settings: Settings, args: argparse.Namespace) -> int:
    shutdown = Shutdown("up", raise_in_main=True)  # interrupts the waits for the children to start
    st = None
    try:
        st = start_services(settings, args.config)
        if not args.no_jobs:
            for name in available_jobs(settings):
                st.start_job(name)
        print_endpoints(st)
        serve(st)
    except (Stopped, KeyboardInterrupt):
        print("stopping ...", flush=True)
    except RollcastError:
        raise
    finally:
        shutdown.ignore_further_signals()
        if st is not None:
            st.stop()
    return 0
