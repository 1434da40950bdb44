"""What every test module may use: running rollcast commands as real processes, waiting for a
condition, and reading a topic from the beginning with an independent consumer.

Test modules import from here (and from the ``*_support`` modules beside them), never from each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Settings

REPO = Path(__file__).resolve().parents[2]


def rollcast(*args: str, env: dict[str, str] | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run ``rollcast ARGS`` to completion with ``env`` added to ours."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **kw,
    )


def start_rollcast(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start ``rollcast ARGS`` in the background, output to ``log`` (or a pipe)."""
    out = open(log, "wb") if log else subprocess.PIPE  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def descendants(pid: int) -> set[int]:
    """All live descendant pids of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_topic(settings: Settings, topic: str, until: int | Callable[[list], bool] | None = None, *,
               timeout: float = 60.0, quiet_s: float = 3.0) -> list:
    """The records of ``topic`` from the beginning of every partition, read by a consumer outside any
    group: until ``until`` holds (a number of records, or a predicate called with the records so far
    after every poll), or, without ``until``, until none came for ``quiet_s`` after the last one (the
    broker's end offsets are not trusted). Returns what it read by ``timeout`` either way; callers
    assert on it."""
    from kafka.structs import TopicPartition

    from pipeline.kafka.clients import make_consumer

    done = (lambda got: len(got) >= until) if isinstance(until, int) else until
    consumer = make_consumer(settings, None)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    got: list = []
    deadline, last = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline:
            if done is not None and done(got):
                break
            batch = consumer.poll(timeout_ms=200)
            for records in batch.values():
                got.extend(records)
            if batch:
                last = time.monotonic()
            elif done is None and last is not None and time.monotonic() - last >= quiet_s:
                break
    finally:
        consumer.close()
    return got


def healthz(port: int) -> tuple[int | None, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return None, {}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:  # not serving yet
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in scrape(port).items() if n == name and want <= set(lab))
