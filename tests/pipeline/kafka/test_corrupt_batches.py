"""A record batch that fails its CRC check stops the job with exit code 4, or is skipped, never retried forever.

Real corrupt batches on the real broker: tansu stores a produced batch as it gets it, without checking
its CRC, so the test's producer corrupts a batch after computing its CRC (a bit of a value flipped, or
the header's record count changed) and the consumers fetch those bytes. A failure that heals (a bit
flipped in transit) is made by the consumer miscomputing one CRC. kafka-python raises
``CorruptRecordError`` for such a batch; unpatched, the poll after it loops inside kafka-python forever.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import kafka.record.default_records as records
import pytest
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY

from pipeline.config import Settings, load_settings
from pipeline.errors import CorruptBatch, StoreUnavailable
from pipeline.kafka.clients import make_consumer, make_producer, poll_promptly
from pipeline.store import HistoryStore
from tests.support.ingest import INGEST_ENV, ingest_child, wait_exit

T = 1_700_000_000_000


@contextlib.contextmanager
def corrupting(monkeypatch: pytest.MonkeyPatch, part: str) -> Iterator[None]:
    """Batches built meanwhile reach the broker with a CRC that fails: ``part="value"`` flips a bit of the
    first record (its value, for the records sent here) after the CRC was computed, so the header still says
    where the batch ends; ``"count"`` raises the header's record count by one, so that no longer agrees
    with its last offset delta."""
    builder = records.DefaultRecordBatchBuilder
    upstream = builder.write_header

    def write_header(self, *args, **kwargs) -> None:
        upstream(self, *args, **kwargs)
        if part == "value":
            self._buffer[builder.HEADER_STRUCT.size + 8] ^= 1  # in the first record, past its framing
        else:
            at = builder.HEADER_STRUCT.size - 4
            struct.pack_into(">i", self._buffer, at, struct.unpack_from(">i", self._buffer, at)[0] + 1)

    with monkeypatch.context() as m:
        m.setattr(builder, "write_header", write_header)
        yield


def produce(s: Settings, monkeypatch: pytest.MonkeyPatch, good: list[bytes], bad: list[bytes],
            after: list[bytes], part: str = "value") -> None:
    """``good``, then ``bad`` as one corrupt batch, then ``after``, to partition 0 of the observations topic."""
    producer = make_producer(s, linger_ms=1000)  # each group is one batch: flush() sends it

    def send(values: list[bytes]) -> None:
        futures = [producer.send(s.topics.observations, v, key=b"g", partition=0) for v in values]
        producer.flush()
        for f in futures:
            f.get(timeout=30)

    send(good)
    with corrupting(monkeypatch, part):
        send(bad)
    send(after)
    producer.close()


def read(s: Settings, want: int, timeout_s: float = 30) -> list[tuple[int, bytes]]:
    """(offset, value) of partition 0 read from its beginning by a consumer of ``s``, as the jobs poll."""
    consumer = make_consumer(s, None)
    tp = TopicPartition(s.topics.observations, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            for batch in poll_promptly(consumer, 200).values():
                got.extend((r.offset, r.value) for r in batch)
    finally:
        consumer.close()
    return got


def counted(action: str) -> float:
    return REGISTRY.get_sample_value("rollcast_corrupt_batches_total", {"action": action}) or 0.0


def with_env(test_env: dict[str, str], **kafka: str) -> Settings:
    return load_settings(env={**test_env, **{f"ROLLCAST_KAFKA__{k.upper()}": v for k, v in kafka.items()}})


def test_a_batch_that_fails_every_fetch_stops_with_an_error_naming_where_it_is(settings, test_env, monkeypatch,
                                                                              caplog):
    s = with_env(test_env, corrupt_batch_attempts="4")
    produce(settings, monkeypatch, [b"g0"], [b"b1", b"b2"], [b"g3"])
    before = counted("stop")
    with caplog.at_level(logging.WARNING, "pipeline.kafka"), pytest.raises(CorruptBatch) as raised:
        read(s, want=4)
    message = str(raised.value)
    assert f"topic {s.topics.observations}, partition 0, offset 1:" in message
    assert "kafka.on_corrupt_batch" in message and "on 4 fetches in a row" in message
    assert counted("stop") == before + 1
    again = [r for r in caplog.records if "fetching it again" in r.getMessage()]
    assert len(again) == 3  # the 4th failure stops
    assert any(r.levelno == logging.ERROR and "offset 1" in r.getMessage() for r in caplog.records)


def test_skip_seeks_past_the_batch_to_the_offset_its_header_gives(settings, test_env, monkeypatch, caplog):
    s = with_env(test_env, on_corrupt_batch="skip")
    produce(settings, monkeypatch, [b"g0"], [b"b1", b"b2", b"b3", b"b4", b"b5"], [b"g6", b"g7"])
    before = counted("skip")
    with caplog.at_level(logging.ERROR, "pipeline.kafka"):
        got = read(s, want=3)
    assert got == [(0, b"g0"), (6, b"g6"), (7, b"g7")]
    assert counted("skip") == before + 1
    [skipped] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"topic {s.topics.observations}, partition 0: skipped offsets 1 to 5" in skipped


def test_skip_steps_one_offset_at_a_time_through_a_batch_whose_header_is_corrupt(settings, test_env, monkeypatch,
                                                                                 caplog):
    s = with_env(test_env, on_corrupt_batch="skip", corrupt_batch_attempts="2")
    produce(settings, monkeypatch, [b"g0"], [b"b1", b"b2", b"b3"], [b"g4"], part="count")
    before = counted("skip")
    with caplog.at_level(logging.ERROR, "pipeline.kafka"):
        got = read(s, want=2)
    assert got == [(0, b"g0"), (4, b"g4")]
    assert counted("skip") == before + 3  # each offset of the batch counted and logged
    steps = [r.getMessage() for r in caplog.records if "skipped offsets" in r.getMessage()]
    assert [m.split("skipped offsets ")[1].split(" (")[0] for m in steps] == ["1 to 1", "2 to 2", "3 to 3"]


def test_a_failure_that_heals_below_the_limit_is_fetched_again_without_skipping(settings, test_env, monkeypatch,
                                                                                 caplog):
    s = with_env(test_env, on_corrupt_batch="skip")
    produce(settings, monkeypatch, [b"g0"], [], [b"g1", b"g2"])
    real, flipped = records.calc_crc32c, []

    def crc_flipped_once(data) -> int:  # a bit flipped in transit, once
        if flipped:
            return real(data)
        flipped.append(True)
        return real(data) ^ 1

    monkeypatch.setattr(records, "calc_crc32c", crc_flipped_once)
    skips, stops = counted("skip"), counted("stop")
    with caplog.at_level(logging.WARNING, "pipeline.kafka"):
        got = read(s, want=3)
    assert got == [(0, b"g0"), (1, b"g1"), (2, b"g2")]
    assert (counted("skip"), counted("stop")) == (skips, stops)
    [again] = [r for r in caplog.records if r.name == "pipeline.kafka"]
    assert again.levelno == logging.WARNING and "fetching it again (1 of 3)" in again.getMessage()


def test_a_corrupt_batch_is_not_retried_as_an_outage() -> None:
    from kafka.errors import KafkaError

    from pipeline.errors import BrokerUnavailable
    from pipeline.runtime import retry_sessions

    calls = []

    def session() -> None:
        calls.append(1)
        raise CorruptBatch("topic t, partition 0, offset 1: ...")

    with pytest.raises(CorruptBatch):
        retry_sessions(session, job="ingest", shutdown=threading.Event(), health=SimpleNamespace(facts={}),
                       errors=(KafkaError, BrokerUnavailable, StoreUnavailable), resuming="resuming")
    assert calls == [1]
    assert CorruptBatch("x").exit_code == 4


def _observations(*ts_values: tuple[int, float]) -> list[bytes]:
    return [b'{"series": "g", "ts": %d, "value": %r}' % (T + dt, v) for dt, v in ts_values]


@pytest.mark.slow
def test_ingest_stops_with_exit_code_4_and_no_traceback(settings, test_env, tmp_path, monkeypatch):
    produce(settings, monkeypatch, _observations((0, 1.0)), _observations((100, 2.0)), _observations((200, 3.0)))
    child = ingest_child(test_env, tmp_path, "ingest", "--exit-when-idle", "10")
    try:
        assert wait_exit(child, 60) == 4, child.tail(30)
    finally:
        child.stop()
    log = (tmp_path / "ingest.log").read_text()
    assert f"rollcast ingest: error: topic {settings.topics.observations}, partition 0, offset 1:" in log
    assert "kafka.on_corrupt_batch" in log and "Traceback" not in log


@pytest.mark.slow
def test_ingest_with_skip_windows_what_follows_the_batch(settings, test_env, tmp_path, monkeypatch):
    produce(settings, monkeypatch, _observations((0, 1.0), (100, 2.0)), _observations((200, 100.0)),
            _observations((300, 4.0), (3000, 5.0)))  # the last one closes [T, T + 1000)
    env = {**test_env, "ROLLCAST_KAFKA__ON_CORRUPT_BATCH": "skip"}
    child = ingest_child(env, tmp_path, "ingest", "--exit-when-idle", "3")
    try:
        assert wait_exit(child, 60) == 0, child.tail(30)
    finally:
        child.stop()
    assert "skipped offsets 2 to 2" in (tmp_path / "ingest.log").read_text()
    windows = HistoryStore(load_settings(env={**test_env, **INGEST_ENV})).read()
    first = windows.filter(windows["window_start"] == T).to_dicts()
    assert [(w["count"], w["sum"]) for w in first] == [(3, 7.0)]  # 1 + 2 + 4: the skipped 100 is not in it
