"""A dead letter never exceeds the DLQ topic's limit: one that would is cut to fit and says so.

The producer here is scripted, not Kafka: ``RecordingProducer`` records each ``send`` (all that
:class:`DeadLetters` calls) and carries the one kafka-python setting it reads, ``max_request_size``. Each
sent record is then encoded as one batch by kafka-python's own record builder, so its size is the size a
broker would get. tests/jobs/test_dlq_limits.py runs the same rule in the ingest job on the real broker.
"""

from __future__ import annotations

import hashlib

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.record.default_records import DefaultRecordBatchBuilder

from pipeline.ingest.decode import MALFORMED_JSON, Rejected
from pipeline.ingest.dlq import MARGIN, DeadLetters
from pipeline.kafka.headers import header_key

LIMIT = 8192


class RecordingProducer:
    """A scripted producer: keeps what it is asked to send."""

    def __init__(self, max_request_size: int = 16 << 20):
        self.config = {"max_request_size": max_request_size}
        self.sent: list[tuple[bytes | None, bytes | None, list]] = []

    def send(self, topic: str, value: bytes | None, key: bytes | None, headers: list) -> None:
        self.sent.append((value, key, headers))


def reject(value: bytes | None, key: bytes | None = b"k", headers: list | None = None,
           rows: bytes | None = None) -> Rejected:
    record = ConsumerRecord("obs", 1, -1, 42, 0, 0, key, value, headers or [], None, -1, -1, -1)
    return Rejected(record, MALFORMED_JSON, "Expecting value: line 1 column 1 (char 0)", value=rows,
                    rows=1 if rows is None else 3)


def send(item: Rejected, limit: int = LIMIT, max_request_size: int = 16 << 20) -> tuple:
    producer = RecordingProducer(max_request_size)
    DeadLetters(producer, "obs.dlq", limit).send(item)
    [(value, key, headers)] = producer.sent
    return value, key, headers


def encoded_size(value: bytes | None, key: bytes | None, headers: list) -> int:
    """The bytes of the one-record batch kafka-python's producer builds (the size the broker checks)."""
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 64 << 20)
    assert builder.append(0, timestamp=1_700_000_000_000, key=key, value=value, headers=headers) is not None
    return len(builder.build())


def test_a_dead_letter_that_fits_is_sent_whole_without_truncation_headers() -> None:
    value, key, headers = send(reject(b"x" * 1000, headers=[("trace", b"t1")]))
    assert (value, key) == (b"x" * 1000, b"k")
    names = [k for k, _ in headers]
    assert names[0] == "trace" and "rollcast-reason" in names and "rollcast-truncated" not in names


@pytest.mark.parametrize("size", [LIMIT - 700, LIMIT - 600, LIMIT - 500, LIMIT, LIMIT + 1, 10 * LIMIT])
def test_a_value_near_or_over_the_limit_is_cut_to_fit_with_its_size_and_hash(size: int) -> None:
    original = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    value, key, headers = send(reject(original, headers=[("trace", b"t1")]))
    h = dict(headers)
    assert encoded_size(value, key, headers) <= LIMIT - MARGIN
    if "rollcast-truncated" not in h:  # it fitted whole
        assert value == original
        return
    assert h["rollcast-truncated"] == b"true"
    assert int(h["rollcast-original-size"]) == len(original)
    assert h["rollcast-value-sha256"].decode() == hashlib.sha256(original).hexdigest()
    assert original.startswith(value) and len(value) > LIMIT - MARGIN - 1000  # as much as fits
    assert key == b"k" and h["trace"] == b"t1"  # key and original headers kept
    assert (h["rollcast-source-topic"], h["rollcast-source-partition"], h["rollcast-source-offset"]) == \
        (b"obs", b"1", b"42")


def test_the_value_is_cut_only_when_it_must_be() -> None:
    """Over the sizes around the limit, the last value sent whole filled the space as kafka-python's producer
    measures a record (an upper bound of its encoded size), and every later one is cut."""
    whole = []
    for size in range(LIMIT - 800, LIMIT):
        value, key, headers = send(reject(b"v" * size))
        assert encoded_size(value, key, headers) <= LIMIT - MARGIN
        if "rollcast-truncated" not in dict(headers):
            assert not whole or whole[-1][0] == size - 1, "a value was cut, then a larger one sent whole"
            whole.append((size, DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)))
    assert whole and whole[-1][0] < LIMIT - 1
    assert whole[-1][1] in (LIMIT - MARGIN - 1, LIMIT - MARGIN)


def test_the_limit_is_the_smaller_of_the_setting_and_the_producers_max_request_size() -> None:
    value, key, headers = send(reject(b"v" * 20_000), limit=50_000, max_request_size=10_000)
    assert encoded_size(value, key, headers) <= 10_000 - MARGIN
    assert dict(headers)["rollcast-original-size"] == b"20000"


def test_a_key_too_big_on_its_own_is_cut_and_says_its_size() -> None:
    big_key = b"K" * (3 * LIMIT)
    value, key, headers = send(reject(b"some value", key=big_key))
    h = dict(headers)
    assert encoded_size(value, key, headers) <= LIMIT - MARGIN
    assert int(h["rollcast-original-key-size"]) == len(big_key) and big_key.startswith(key)
    assert b"some value".startswith(value) and len(value) < 4  # hardly any room left: its size and hash say it
    assert (int(h["rollcast-original-size"]), h["rollcast-value-sha256"].decode()) == \
        (10, hashlib.sha256(b"some value").hexdigest())


def test_original_headers_that_do_not_fit_are_dropped_from_the_last_and_counted() -> None:
    originals = [("first", b"1"), (header_key(b"\xff-not-utf8"), b"2"), *((f"h{i}", b"x" * 1000) for i in range(20))]
    value, key, headers = send(reject(b"value", headers=originals))
    h = dict(headers)
    assert encoded_size(value, key, headers) <= LIMIT - MARGIN
    assert int(h["rollcast-original-headers"]) == len(originals)
    kept = [k for k, _ in headers if not k.startswith("rollcast-")]
    assert 2 < len(kept) < len(originals) and kept == [k for k, _ in originals[: len(kept)]]
    assert headers[1][0].encode() == b"\xff-not-utf8"  # forwarded byte for byte
    assert key == b"k" and b"value".startswith(value)


def test_rejected_arrow_rows_too_big_are_cut_with_the_hash_of_their_stream() -> None:
    rows = b"A" * (2 * LIMIT)
    value, key, headers = send(reject(b"the whole arrow message", rows=rows))
    h = dict(headers)
    assert encoded_size(value, key, headers) <= LIMIT - MARGIN
    assert h["rollcast-rows"] == b"3" and rows.startswith(value)
    assert h["rollcast-value-sha256"].decode() == hashlib.sha256(rows).hexdigest()


def test_a_record_of_no_key_and_no_value_is_sent_with_an_empty_value() -> None:
    assert send(reject(None, key=None))[:2] == (b"", None)
