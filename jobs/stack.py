"""The embedded stack that `rollcast up` and `rollcast demo` run: a broker and an MLflow server, and
the pipeline jobs against them.

:func:`start_services` starts (or finds the configured) broker and MLflow server, creates the topics
and records the endpoints; the :class:`Stack` it returns starts jobs as ``rollcast`` child processes,
restarts a job that dies, and stops every child, jobs first. The child processes themselves (the
tansu broker, the MLflow server, process groups and logs) are :mod:`pipeline.processes`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import processes
from pipeline.config import Settings, stack_file
from pipeline.processes import Child, broker_binary, free_port, start_broker, start_mlflow, stop_all
from pipeline.store import set_aside_local_store

log = logging.getLogger("rollcast.up")


@dataclass
class Stack:
    """The running stack: endpoints, children and how to start a job."""

    settings: Settings
    config_path: str | None
    bootstrap_servers: str = ""
    tracking_uri: str = ""
    embedded_broker: bool = False  # the stack started the broker (tansu): jobs get processes.embedded_env
    children: list[Child] = field(default_factory=list)
    jobs: dict[str, Child] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.settings.data_dir / "logs"

    def job_env(self, job: str = "") -> dict[str, str]:
        """Environment for child jobs (``job``, the command): ours, plus the endpoints this stack uses and what
        its broker needs (``processes.embedded_env``)."""
        env = dict(os.environ)
        env["ROLLCAST_KAFKA__BOOTSTRAP_SERVERS"] = self.bootstrap_servers
        env["ROLLCAST_MLFLOW__TRACKING_URI"] = self.tracking_uri
        env["ROLLCAST_DATA_DIR"] = str(self.settings.data_dir.resolve())
        if self.embedded_broker:
            env.update(processes.embedded_env(self.settings, job))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def job_argv(self, name: str, *extra: str) -> list[str]:
        argv = [sys.executable, "-m", "jobs.cli"]
        if self.config_path:
            argv += ["--config", str(Path(self.config_path).resolve())]
        return [*argv, name, *extra]

    def start_job(self, name: str, *extra: str) -> Child:
        child = Child(name, self.job_argv(name, *extra), self.log_dir / f"{name}.log", env=self.job_env(name))
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
        stop_all(self.children, self.settings.embedded.stop_timeout_s)
        self.children.clear()
        self.jobs.clear()
        with contextlib.suppress(FileNotFoundError):
            stack_file(self.settings).unlink()


def start_services(settings: Settings, config_path: str | None) -> Stack:
    """Start (or find) the broker and MLflow server, create topics, record the endpoints."""
    from pipeline.kafka.clients import ensure_topics

    st = Stack(settings, config_path)
    emb = settings.embedded
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if settings.kafka.bootstrap_servers:
            st.bootstrap_servers = settings.kafka.bootstrap_servers
            log.info("using the configured Kafka cluster at %s", st.bootstrap_servers)
        else:  # an in-memory broker: a new one each start, so the previous run's store counts stale offsets
            set_aside_local_store(settings)
            port = emb.broker_port or free_port()
            st.children.append(start_broker(broker_binary(emb.broker_bin), port, st.log_dir, emb.start_timeout_s))
            st.bootstrap_servers = f"127.0.0.1:{port}"
            st.embedded_broker = True
        if settings.mlflow.tracking_uri:
            st.tracking_uri = settings.mlflow.tracking_uri
            processes.wait_for_mlflow(st.tracking_uri, settings.mlflow.connect_timeout_s)
            log.info("using the configured MLflow server at %s", st.tracking_uri)
        else:
            port = emb.mlflow_port or free_port()
            st.children.append(start_mlflow(settings.data_dir / "mlflow", port, st.log_dir, emb.start_timeout_s))
            st.tracking_uri = f"http://127.0.0.1:{port}"
        ensure_topics(settings.replace(**{"kafka.bootstrap_servers": st.bootstrap_servers}))
        stack_file(settings).write_text(
            json.dumps({"pid": os.getpid(), "bootstrap_servers": st.bootstrap_servers, "tracking_uri": st.tracking_uri})
        )
    except BaseException:
        st.stop()
        raise
    return st


def available_jobs(settings: Settings) -> list[str]:
    """The configured long-running jobs that this installation has (a module under jobs/ each)."""
    return [j for j in settings.embedded.jobs if importlib.util.find_spec(f"jobs.{j}") is not None]


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
