"""Helpers shared by the ingest tests: produce observations, run the job, compute the reference."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.config import Settings
from pipeline.kafka.clients import make_producer
from pipeline.kafka.headers import header_key
from pipeline.processes import Child
from pipeline.store import HistoryStore
from pipeline.windows_io import decode_windows
from tests.support import wait_for
from tests.support.forecast import L as FORECAST_L
from tests.support.reference import reference_windows

INGEST_ENV = {
    "ROLLCAST_WINDOW__LENGTH_MS": "1000",
    "ROLLCAST_WINDOW__LATENESS_MS": "500",
    "ROLLCAST_WINDOW__IDLE_TIMEOUT_S": "3600",
}


def make_observations(n: int, series: int, seed: int = 0, t0: int = 1_700_000_000_000) -> list[dict]:
    """Observations in roughly increasing event time, some out of order (a few late), with gaps."""
    rng = random.Random(seed)
    out = []
    t = t0
    for _ in range(n):
        t += rng.choice([0, 40, 90, 150]) if rng.random() > 0.01 else 4000  # occasional gap
        jitter = rng.randint(-900, 0) if rng.random() < 0.1 else 0  # late-ish events
        out.append({"series": f"s{rng.randrange(series)}", "ts": t + jitter, "value": round(rng.uniform(-50, 50), 3)})
    return out


def produce(settings: Settings, observations: list[dict]) -> list[tuple[int, int, dict]]:
    """Send JSON observations keyed by series; return (partition, offset, obs) for each."""
    producer = make_producer(settings)
    futures = [
        (producer.send(settings.topics.observations, json.dumps(o).encode(), key=o["series"].encode()), o)
        for o in observations
    ]
    producer.flush()
    out = []
    for fut, o in futures:
        md = fut.get(timeout=30)
        out.append((md.partition, md.offset, o))
    producer.close()
    return out


def reference(sent: list[tuple[int, int, dict]], length: int = 1000, grace: int = 500) -> pl.DataFrame:
    """Windows the per-event reference closes, partition by partition (offset order)."""
    return reference_and_late(sent, length, grace)[0]


def reference_and_late(sent: list[tuple[int, int, dict]], length: int = 1000, grace: int = 500) -> tuple[pl.DataFrame, int]:
    """Reference windows and the number of late events."""
    rows: list[dict] = []
    late = 0
    for p in sorted({p for p, _, _ in sent}):
        items = [("event", o["series"], o["ts"], o["value"], off) for q, off, o in sorted(sent, key=lambda x: x[1]) if q == p]
        windows, late_seqs = reference_windows(items, length, grace)
        rows.extend(windows)
        late += len(late_seqs)
    df = pl.DataFrame(rows, schema=HistoryStore("/nonexistent").read().schema).sort("series", "window_start")
    return df, late


def checkpoints(store: HistoryStore) -> tuple[bytes, ...]:
    """The progress records as stored: a change means a new checkpoint.

    File times would not do on S3 (one-second resolution). A read that races a replace on an
    object store may come back torn or fail; either reads as a change, which is what it is.
    """
    found = store.fs.get_file_info(pafs.FileSelector(f"{store.root}/_progress", allow_not_found=True, recursive=True))
    out = []
    for info in sorted(found, key=lambda i: i.path):
        if info.path.endswith(".json"):
            try:
                with store.fs.open_input_stream(info.path) as f:
                    out.append(f.read())
            except OSError:
                out.append(b"(read while being replaced)")
    return tuple(out)


def progress_positions(store: HistoryStore, topic: str, partitions: int) -> dict[int, int]:
    """The position each partition's progress record (the commit point in the store) holds."""
    out = {}
    for p in range(partitions):
        progress = store.progress(topic, p)
        if progress is not None:
            out[p] = progress.position
    return out


WINDOW_KEYS = ["series", "window_start"]
WINDOW_VALUES = ("window_end", "count", "first", "last", "min", "max", "mean", "sum")


def window_faults(got: pl.DataFrame, want: pl.DataFrame, tolerance: float = 1e-6) -> dict[str, int]:
    """Count what is wrong with the windows ``got`` (a store read or a topic's rows, repeats kept)
    against the reference ``want``: ``lost`` (windows of ``want`` missing), ``duplicated`` (rows
    beyond the first of a window), ``wrong`` (rows whose values differ from the reference's, by
    more than ``tolerance`` or in which are null) and ``unexpected`` (rows of windows ``want``
    lacks)."""
    keys = WINDOW_KEYS
    joined = got.join(want, on=keys, how="inner", suffix="_want")
    differs = pl.lit(False)
    for c in WINDOW_VALUES:
        a, b = pl.col(c).cast(pl.Float64), pl.col(f"{c}_want").cast(pl.Float64)
        differs = differs | (a.is_null() != b.is_null()) | ((a - b).abs() > tolerance).fill_null(False)
    return {
        "lost": want.select(keys).join(got.select(keys), on=keys, how="anti").height,
        "duplicated": got.height - got.select(keys).unique().height,
        "wrong": joined.filter(differs).height,
        "unexpected": got.select(keys).join(want.select(keys), on=keys, how="anti").height,
    }


def assert_frames_equal(got: pl.DataFrame, want: pl.DataFrame) -> None:
    keys = ["series", "window_start"]
    assert got.select(keys).is_duplicated().sum() == 0, "a window was stored twice"
    assert got.select(keys).rows() == want.select(keys).rows()
    assert got["count"].to_list() == want["count"].to_list()
    assert got["window_end"].to_list() == want["window_end"].to_list()
    for c in ("first", "last", "min", "max", "mean", "sum"):
        a, b = got[c], want[c]
        assert (a.is_null() == b.is_null()).all(), c
        diff = (a - b).abs().fill_null(0.0)
        assert float(diff.max() or 0.0) < 1e-6, c


def ingest_child(test_env: dict[str, str], tmp: Path, name: str, *args: str) -> Child:
    env = {**os.environ, **test_env, **INGEST_ENV, "ROLLCAST_KAFKA__MAX_POLL_RECORDS": "400"}
    argv = [sys.executable, "-m", "jobs.cli", "ingest", "--checkpoint-interval-s", "0.1", *args]
    return Child(name, argv, tmp / f"{name}.log", env=env).start()


def child_log(child: Child) -> str:
    """Everything ``child`` logged so far ("" before it wrote anything)."""
    try:
        return child.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def exit_code_after_sigterm(child: Child, timeout_s: float = 30) -> int | None:
    """The exit status of a process already sent one SIGTERM, or None if it did not exit in time
    (``Child.stop`` would send another, which a Python process in interpreter shutdown, its handlers gone,
    dies of: -15)."""
    try:
        return child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def wait_exit(child: Child, timeout_s: float = 60) -> int:
    wait_for(lambda: not child.alive(), timeout_s, f"{child.name} to exit; log:\n{child.tail(30)}")
    return child.proc.returncode


def windows_from_topic(records: list) -> pl.DataFrame:
    frames = [pl.from_arrow(decode_windows(r.value)) for r in records]
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames).unique(["series", "window_start"], keep="first").sort("series", "window_start")


def job_env(base: dict[str, str], metrics_port: int, **extra: str) -> dict[str, str]:
    return {**os.environ, **base, **INGEST_ENV, "PYTHONUNBUFFERED": "1",
            "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(metrics_port),
            "ROLLCAST_OBSERVABILITY__SHUTDOWN_TIMEOUT_S": "20",
            "ROLLCAST_KAFKA__CONNECT_TIMEOUT_S": "5", "ROLLCAST_MODEL__CONTEXT": str(FORECAST_L), **extra}


def start_job(name: str, env: dict[str, str], log: Path, *args: str) -> Child:
    return Child(name, [sys.executable, "-m", "jobs.cli", *args], log, env=env).start()


def start_ingest(base: dict[str, str], tmp: Path, name: str, port: int) -> Child:
    return ingest_child({**base, "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(port),
                         "ROLLCAST_OBSERVABILITY__SHUTDOWN_TIMEOUT_S": "20"}, tmp, name)


def start_forecast(base: dict[str, str], tmp: Path, name: str, port: int, model_dir: Path | None) -> Child:
    args = ["forecast", *(["--model-dir", str(model_dir)] if model_dir else [])]
    return start_job(name, job_env(base, port), tmp / f"{name}.log", *args)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def malformed_kinds() -> list[tuple[str, bytes | None, list[tuple[str, bytes]], str]]:
    """Every kind of bad input we know of: ``(name, value, headers, the DLQ reason it must get)``.

    Each is one DLQ message (an Arrow batch here has one bad row at most, or is rejected whole)."""
    t = 1_700_000_000_000
    arrow = [("content-type", b"application/vnd.apache.arrow.stream")]
    bad_utf8 = pa.array([b"\xff\xfe"], pa.binary()).view(pa.string())
    ts, v = pa.array([t]), pa.array([1.0])
    ok_ipc = _ipc(pa.table({"series": ["a"], "ts": ts, "value": v}))

    def obj(**kw: object) -> bytes:
        return json.dumps({"series": "g", "ts": t, "value": 1.0, **kw}).encode()

    deep = b"[" * 5000 + b"]" * 5000
    return [
        ("truncated JSON", b'{"series": "x", "ts": 1', [], "malformed_json"),
        ("not JSON", b"not json at all", [], "malformed_json"),
        ("a JSON array", b"[1, 2]", [], "malformed_json"),
        ("two objects in one message", obj()[:-1] + b', "a": 1}' + obj(series="h"), [], "malformed_json"),
        ("empty value", b"", [], "malformed_json"),
        ("blank value", b" \r", [], "malformed_json"),
        ("no value (tombstone)", None, [], "malformed_json"),
        ("huge array", b"[" + b"1," * 20_000 + b"1]", [], "malformed_json"),
        ("deep array", deep, [], "malformed_json"),
        ("deep array as ts", b'{"series": "g", "ts": ' + deep + b', "value": 1.0}', [], "malformed_json"),
        ("invalid UTF-8 in series", b'{"series": "\xff\xfe", "ts": %d, "value": 1.0}' % t, [], "malformed_json"),
        ("invalid UTF-8 in a key", b'{"ser\xc0ies": "g", "ts": %d, "value": 1.0}' % t, [], "malformed_json"),
        ("invalid UTF-8 elsewhere", b'{"series": "g", "ts": %d, "value": 1.0, "x": "\xed\xa0\x80"}' % t, [],
         "malformed_json"),
        ("lone surrogate escape", b'{"series": "\\udc00g", "ts": %d, "value": 1.0}' % t, [], "malformed_json"),
        ("UTF-16", obj().decode().encode("utf-16"), [], "malformed_json"),
        ("missing ts", json.dumps({"series": "g", "value": 1.0}).encode(), [], "missing_field"),
        ("null series", obj(series=None), [], "missing_field"),
        ("numeric series", obj(series=5), [], "wrong_type"),
        ("boolean ts", obj(ts=True), [], "wrong_type"),
        ("float ts", obj(ts=1.5), [], "wrong_type"),
        ("string value", obj(value="1.5"), [], "wrong_type"),
        ("header key not UTF-8", obj(value=[1]), [(header_key(b"tr\xffce"), b"\xff")], "wrong_type"),
        ("bad ISO timestamp", obj(ts="yesterday"), [], "bad_timestamp"),
        ("NaN", b'{"series": "g", "ts": %d, "value": NaN}' % t, [], "non_finite"),
        ("Infinity", b'{"series": "g", "ts": %d, "value": -Infinity}' % t, [], "non_finite"),
        ("1e400", b'{"series": "g", "ts": %d, "value": 1e400}' % t, [], "non_finite"),
        ("negative ts", obj(ts=-5), [], "ts_out_of_range"),
        ("ts beyond 64 bits", obj(ts=2**70), [], "ts_out_of_range"),
        ("not Arrow", b"\x00\x01 not arrow", arrow, "bad_arrow"),
        ("JSON marked as Arrow", obj(), arrow, "bad_arrow"),
        ("truncated Arrow", ok_ipc[: len(ok_ipc) // 2], arrow, "bad_arrow"),
        ("Arrow, invalid UTF-8", _ipc(pa.table({"series": bad_utf8, "ts": ts, "value": v})), arrow, "bad_arrow"),
        ("Arrow, invalid UTF-8 in a dictionary",
         _ipc(pa.table({"series": bad_utf8.dictionary_encode(), "ts": ts, "value": v})), arrow, "bad_arrow"),
        ("Arrow, invalid UTF-8 in another column",
         _ipc(pa.table({"series": ["a"], "ts": ts, "value": v, "note": bad_utf8})), arrow, "bad_arrow"),
        ("Arrow, no value column", _ipc(pa.table({"series": ["a"], "ts": ts})), arrow, "missing_field"),
        ("Arrow, integer series", _ipc(pa.table({"series": [1], "ts": ts, "value": v})), arrow, "wrong_type"),
        ("Arrow, struct series", _ipc(pa.table({"series": [{"a": "b"}], "ts": ts, "value": v})), arrow, "wrong_type"),
        ("Arrow, uint64 ts overflow",
         _ipc(pa.table({"series": ["a"], "ts": pa.array([2**64 - 1], pa.uint64()), "value": v})), arrow, "wrong_type"),
        ("Arrow, a NaN row", _ipc(pa.table({"series": ["a"], "ts": ts, "value": [float("nan")]})), arrow, "non_finite"),
    ]


def produce_raw(settings: Settings, messages: list[tuple[bytes | None, bytes | None, list]]) -> list[tuple[int, int]]:
    """Send ``(value, key, headers)`` as they are; return (partition, offset) for each."""
    producer = make_producer(settings)
    futures = [producer.send(settings.topics.observations, value, key=key, headers=headers)
               for value, key, headers in messages]
    producer.flush()
    out = [(md.partition, md.offset) for md in (f.get(timeout=30) for f in futures)]
    producer.close()
    return out
