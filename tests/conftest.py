"""Shared fixtures: one real tansu broker, one real MLflow server and one real S3 server per session.

Tests run against real processes: the broker, MLflow and S3 servers are never
mocked (the S3 server is moto's, a separate process speaking the S3 HTTP API).
The exception is poll logic: four tests drive a function that only calls
``poll()`` (and ``assignment()``) with a scripted consumer, an object that
hands out prepared fetches instead of talking to a broker, so that a timing
case can be made to happen at will: ``SleepingConsumer`` in
tests/pipeline/test_kafka_poll.py and ``ScriptedConsumer`` in
tests/pipeline/test_windows_io.py. Tests of header parsing likewise build record
objects (``SimpleNamespace(headers=…)``) instead of consuming them. Each test
that needs topics gets its own uniquely named ones (``settings`` fixture),
deleted when it ends, so tests do not see each other's messages.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import processes
from pipeline.config import Settings, load_settings
from tests.support.s3 import S3_BUCKET, S3_KEYS, create_bucket

logging.getLogger("kafka").setLevel(logging.CRITICAL)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a session-wide tansu broker (in-memory)."""
    logs = tmp_path_factory.mktemp("broker-logs")
    port = processes.free_port()
    child = processes.start_broker(processes.broker_binary(None), port, logs)
    yield f"127.0.0.1:{port}"
    child.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a session-wide ``mlflow server`` with a SQLite store."""
    root = tmp_path_factory.mktemp("mlflow")
    port = processes.free_port()
    child = processes.start_mlflow(root, port, root / "logs", timeout_s=180)
    yield f"http://127.0.0.1:{port}"
    child.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a session-wide moto S3 server holding the bucket ``S3_BUCKET``."""
    logs = tmp_path_factory.mktemp("s3-logs")
    port = processes.free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    child = processes.Child("moto-s3", argv, logs / "moto.log").start()
    try:
        child.wait_healthy(lambda: processes.http_ok(f"http://127.0.0.1:{port}/moto-api/"), timeout_s=60)
        create_bucket(f"127.0.0.1:{port}", S3_BUCKET)
        yield f"127.0.0.1:{port}"
    finally:
        child.stop()


@pytest.fixture
def s3_uri(s3_server: str) -> str:
    """A fresh prefix in the session bucket, as a ``pyarrow.fs.FileSystem.from_uri`` URI."""
    prefix = uuid.uuid4().hex[:10]
    return f"s3://{S3_KEYS}@{S3_BUCKET}/{prefix}?region=us-east-1&scheme=http&endpoint_override={s3_server}"


def _topic_env(suffix: str) -> dict[str, str]:
    return {
        "ROLLCAST_TOPICS__OBSERVATIONS": f"obs-{suffix}",
        "ROLLCAST_TOPICS__DLQ": f"obs-{suffix}.dlq",
        "ROLLCAST_TOPICS__WINDOWS": f"win-{suffix}",
        "ROLLCAST_TOPICS__FORECASTS": f"fc-{suffix}",
        "ROLLCAST_TOPICS__SCORES": f"scores-{suffix}",
        "ROLLCAST_GROUPS__INGEST": f"ingest-{suffix}",
        "ROLLCAST_GROUPS__FORECAST": f"forecast-{suffix}",
        "ROLLCAST_GROUPS__SCORES": f"scores-{suffix}",
    }


@pytest.fixture
def test_env(broker: str, tmp_path: Path) -> dict[str, str]:
    """``ROLLCAST_*`` variables for this test: the session broker, fresh topics and data dir.

    Pass it to subprocesses (``env={**os.environ, **test_env}``) to run jobs
    against the same topics as the test.
    """
    suffix = uuid.uuid4().hex[:10]
    return {
        "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": broker,
        "ROLLCAST_KAFKA__PARTITIONS": "2",
        "ROLLCAST_DATA_DIR": str(tmp_path / "data"),
        **_topic_env(suffix),
    }


@pytest.fixture
def settings(test_env: dict[str, str]) -> Iterator[Settings]:
    """Settings for one test, with its own topics created on the session broker."""
    yield from _with_topics(test_env)


@pytest.fixture
def settings3(test_env: dict[str, str]) -> Iterator[Settings]:
    """As ``settings``, with three partitions per topic (``test_env`` gets the same partition count)."""
    test_env["ROLLCAST_KAFKA__PARTITIONS"] = "3"
    yield from _with_topics(test_env)


def _with_topics(env: dict[str, str]) -> Iterator[Settings]:
    from pipeline.kafka.clients import ensure_topics, make_admin

    s = load_settings(env=env)
    ensure_topics(s)
    yield s
    admin = make_admin(s)
    try:
        admin.delete_topics([s.topics.observations, s.topics.dlq, s.topics.windows, s.topics.forecasts,
                             s.topics.scores])
    except Exception as e:  # noqa: BLE001 - cleanup must not fail the test
        logging.getLogger(__name__).warning("could not delete test topics: %s", e)
    finally:
        admin.close()
