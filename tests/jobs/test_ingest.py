"""`rollcast ingest` against the real broker: reference windows, the windows topic, the DLQ."""

from __future__ import annotations

import json
import math

import polars as pl
import pyarrow as pa
import pytest

from pipeline.config import load_settings
from pipeline.kafka.clients import make_producer
from pipeline.kafka.headers import ARROW_CONTENT_TYPE
from pipeline.kafka.partitioning import partition_for
from pipeline.store import HistoryStore
from pipeline.windows_io import decode_windows
from tests.support import read_topic
from tests.support.ingest import (
    INGEST_ENV,
    assert_frames_equal,
    ingest_child,
    make_observations,
    produce,
    reference_and_late,
    wait_exit,
    windows_from_topic,
)

pytestmark = pytest.mark.slow


def test_windows_match_reference_and_topic(settings, test_env, tmp_path):
    s = load_settings(env={**test_env, **INGEST_ENV})
    sent = produce(s, make_observations(3000, series=5, seed=1))
    child = ingest_child(test_env, tmp_path, "ingest", "--exit-when-idle", "2")
    assert wait_exit(child) == 0, child.tail(30)
    want, late_expected = reference_and_late(sent)
    got = HistoryStore(s).read()
    assert got.height > 50 and (got["count"] == 0).any()
    assert_frames_equal(got, want)
    # the windows topic holds the same windows, each message on its series' partition
    n_parts = 2
    recs = read_topic(s, s.topics.windows, lambda got_: windows_from_topic(got_).height >= want.height, timeout=30)
    batches: dict[str, tuple[set[int], set[int]]] = {}  # id -> (announced partitions, partitions seen)
    for r in recs:
        series = set(pl.from_arrow(decode_windows(r.value))["series"].to_list())
        assert {partition_for(x, n_parts) for x in series} == {r.partition}
        batch, parts = dict(r.headers)["rollcast-batch"].decode().split("/")
        announced, seen = batches.setdefault(batch, ({int(p) for p in parts.split(",")}, set()))
        assert announced == {int(p) for p in parts.split(",")}
        seen.add(r.partition)
    # every checkpoint's messages name their batch and exactly the partitions it reached
    assert batches and all(announced == seen for announced, seen in batches.values())
    assert_frames_equal(windows_from_topic(recs), want)
    # late events went to the DLQ with reason `late`
    dlq = read_topic(s, s.topics.dlq, late_expected, timeout=30)
    assert len(dlq) == late_expected > 0
    assert {dict(r.headers)["rollcast-reason"] for r in dlq} == {b"late"}
    # reading API
    store = HistoryStore(s)
    assert store.count() == want.height
    last = store.last_windows(3)
    assert last.group_by("series").len()["len"].max() == 3
    t0 = int(want["window_start"].min()) + 5000
    part = store.read(series="s1", start_ms=t0, end_ms=t0 + 10_000)
    assert part.height == want.filter(
        (pl.col("series") == "s1") & (pl.col("window_start") >= t0) & (pl.col("window_start") < t0 + 10_000)
    ).height > 0
    assert store.max_window_end()["s1"] == int(want.filter(pl.col("series") == "s1")["window_end"].max())


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_bad_input_goes_to_dlq_and_job_keeps_running(settings, test_env, tmp_path):
    s = load_settings(env={**test_env, **INGEST_ENV})
    t = 1_700_000_000_000
    good = [{"series": "g", "ts": t + i * 100, "value": float(i)} for i in range(40)]
    bad = [
        (b'{"series": "g", "ts": 1', "malformed_json"),
        (b"[1, 2]", "malformed_json"),
        (json.dumps({"series": "g", "value": 1.0}).encode(), "missing_field"),
        (json.dumps({"series": 5, "ts": t, "value": 1.0}).encode(), "wrong_type"),
        (json.dumps({"series": "g", "ts": t, "value": "1.5"}).encode(), "wrong_type"),
        (json.dumps({"series": "g", "ts": "yesterday", "value": 1.0}).encode(), "bad_timestamp"),
        (b'{"series": "g", "ts": 1700000000000, "value": NaN}', "non_finite"),
        (b'{"series": "g", "ts": 1700000000000, "value": 1e400}', "non_finite"),
        (json.dumps({"series": "g", "ts": -5, "value": 1.0}).encode(), "ts_out_of_range"),
        (b"\x00\x01 not arrow", "bad_arrow"),
    ]
    producer = make_producer(s)
    futs = []
    for i, o in enumerate(good):
        futs.append(producer.send(s.topics.observations, json.dumps(o).encode(), key=b"g"))
        if i < len(bad):
            value, reason = bad[i]
            headers = [("trace", b"x%d" % i)]
            if reason == "bad_arrow":
                headers.append(("content-type", ARROW_CONTENT_TYPE.encode()))
            futs.append(producer.send(s.topics.observations, value, key=b"g", headers=headers))
    # an Arrow batch with one NaN row, and a late JSON event (window already closed)
    arrow = pa.table({"series": ["g", "g"], "ts": [t + 4000, t + 4001], "value": [1.0, math.nan]})
    futs.append(producer.send(s.topics.observations, _arrow(arrow), key=b"g",
                              headers=[("content-type", ARROW_CONTENT_TYPE.encode())]))
    futs.append(producer.send(s.topics.observations, json.dumps({"series": "g", "ts": t, "value": 9.0}).encode(),
                              key=b"g"))
    producer.flush()
    meta = [f.get(timeout=30) for f in futs]
    producer.close()

    child = ingest_child(test_env, tmp_path, "ingest", "--exit-when-idle", "2")
    assert wait_exit(child) == 0, child.tail(30)
    expected = [r for _, r in bad] + ["non_finite", "late"]
    dlq = read_topic(s, s.topics.dlq, len(expected), timeout=30)
    reasons = sorted(dict(r.headers)["rollcast-reason"].decode() for r in dlq)
    assert reasons == sorted(expected)
    by_offset = {m.offset: m for m in meta}
    for r in dlq:
        h = dict(r.headers)
        assert h["rollcast-source-topic"].decode() == s.topics.observations
        off = int(h["rollcast-source-offset"])
        assert off in by_offset and int(h["rollcast-source-partition"]) == by_offset[off].partition
        assert r.key == b"g"
        reason = h["rollcast-reason"].decode()
        if reason in dict((v, k) for k, v in bad) and reason not in ("non_finite",):
            assert "trace" in h  # original headers kept
    original = {r: v for v, r in bad}
    for r in dlq:
        h = dict(r.headers)
        if h["rollcast-reason"] == b"malformed_json" and r.value == original["malformed_json"]:
            break
    else:
        pytest.fail("malformed JSON was not forwarded with its original bytes")
    got = HistoryStore(s).read()
    # the watermark (t + 4001 - 500) closed [t, t + 3000): 30 good events; later windows stay open
    assert got["window_start"].to_list() == [t, t + 1000, t + 2000]
    assert got["count"].to_list() == [10, 10, 10]
