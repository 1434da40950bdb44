"""``poll_promptly``: records that arrive while kafka-python's poll sleeps are still returned promptly; the
record reader installed in kafka-python's fetch path reads what kafka-python's own reads.

Poll logic only, with a scripted consumer (see tests/conftest.py); ``poll_promptly`` also runs in every
job test against the real broker."""

from __future__ import annotations

import importlib.util
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.errors import CorruptRecordError
from kafka.record import default_records
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from pipeline.kafka.clients import POLL_SLICE_MS, poll_promptly
from pipeline.kafka.headers import HeaderKey


class SleepingConsumer:
    """A scripted consumer, not Kafka: it plays kafka-python's poll when its fetcher is idle, which
    sleeps out the whole timeout without fetching, so records that became available meanwhile come back
    only from the next poll (a case a real broker produces only now and then)."""

    def __init__(self, ready_after_s: float | None):
        self.ready_at = None if ready_after_s is None else time.monotonic() + ready_after_s
        self.timeouts: list[int] = []

    def poll(self, timeout_ms: int) -> dict:
        self.timeouts.append(timeout_ms)
        if self.ready_at is not None and time.monotonic() >= self.ready_at:
            return {"tp": ["record"]}
        time.sleep(timeout_ms / 1000)
        return {}


def test_records_arriving_during_a_sleeping_poll_are_returned_long_before_the_timeout() -> None:
    consumer = SleepingConsumer(ready_after_s=0.03)
    t0 = time.monotonic()
    records = poll_promptly(consumer, timeout_ms=3000)
    elapsed = time.monotonic() - t0
    assert records == {"tp": ["record"]}
    # one plain poll(3000) would have slept 3 s; each slice sleeps at most POLL_SLICE_MS
    assert elapsed < 1.5
    assert consumer.timeouts and max(consumer.timeouts) <= POLL_SLICE_MS


def test_nothing_arriving_returns_empty_after_the_whole_timeout() -> None:
    consumer = SleepingConsumer(ready_after_s=None)
    t0 = time.monotonic()
    assert poll_promptly(consumer, timeout_ms=60) == {}
    # the whole timeout, in several slices of at most POLL_SLICE_MS (how many depends on how far each
    # sleep overshoots on a loaded machine, so they are not counted)
    assert time.monotonic() - t0 >= 0.06
    assert len(consumer.timeouts) > 1 and max(consumer.timeouts) <= POLL_SLICE_MS
    # a zero timeout is one non-blocking poll, as consumer.poll(timeout_ms=0)
    consumer = SleepingConsumer(ready_after_s=None)
    assert poll_promptly(consumer, timeout_ms=0) == {}
    assert consumer.timeouts == [0]


def _upstream_batch_class() -> type:
    """kafka-python's ``DefaultRecordBatch`` as it ships (importing pipeline.kafka.clients patched the one in use)."""
    spec = importlib.util.spec_from_file_location("upstream_default_records", default_records.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DefaultRecordBatch


UPSTREAM = _upstream_batch_class()
RECORD = st.tuples(
    st.one_of(st.none(), st.binary(max_size=40)),  # key
    st.one_of(st.none(), st.binary(max_size=200)),  # value
    st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=20))), max_size=3),  # headers
    st.integers(0, 10**6),  # timestamp delta
)


def _batch(records: list) -> bytes:
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 20)
    for i, (key, value, headers, ts) in enumerate(records):
        builder.append(i, timestamp=1_700_000_000_000 + ts, key=key, value=value, headers=headers)
    return bytes(builder.build())


def _fields(record: object) -> tuple:
    return (record.offset, record.timestamp, record.timestamp_type, record.key, record.value, list(record.headers),
            record.size_in_bytes, type(record).__name__)


@settings(max_examples=200, deadline=None)
@given(st.lists(RECORD, min_size=1, max_size=20))
def test_records_read_as_kafka_python_reads_them(records: list) -> None:
    data = _batch(records)
    ours, theirs = list(DefaultRecordBatch(data)), list(UPSTREAM(data))
    assert [_fields(r) for r in ours] == [_fields(r) for r in theirs]
    for r in ours:  # no headers: the empty tuple, not an empty list of its own (nothing for the collector)
        assert r.headers or r.headers == ()


def test_a_header_key_that_is_not_utf8_is_read_where_kafka_python_raises() -> None:
    class RawKey(str):  # a producer that writes these bytes as the key
        def encode(self, *args, **kwargs) -> bytes:
            return b"\xffbad"

    data = _batch([(b"k", b"v", [(RawKey("x"), b"1")], 0), (None, b"w", [], 1)])
    first, second = DefaultRecordBatch(data)
    assert isinstance(first.headers[0][0], HeaderKey) and first.headers[0][0].encode() == b"\xffbad"
    assert (second.value, second.headers) == (b"w", ())
    with pytest.raises(CorruptRecordError):
        list(UPSTREAM(data))


def test_a_record_of_the_wrong_size_raises_as_in_kafka_python() -> None:
    data = bytearray(_batch([(b"k", b"value", [], 0)]))
    data[61] += 2  # the record's length (a zigzag varint right after the 61-byte batch header): one byte more
    for cls in (DefaultRecordBatch, UPSTREAM):
        with pytest.raises(CorruptRecordError, match="Invalid record size"):
            list(cls(bytes(data)))
