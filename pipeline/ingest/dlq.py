"""The dead-letter topic: rejected input with its original bytes, key and headers.

Headers added: ``rollcast-reason`` (one of :data:`pipeline.ingest.decode.REASONS`),
``rollcast-error`` (a readable detail), ``rollcast-source-topic``,
``rollcast-source-partition`` and ``rollcast-source-offset``. Rejected rows of
an Arrow batch are sent as an Arrow IPC stream of just those rows, with
``rollcast-rows`` giving their number. A header key that is not UTF-8 comes
from the consumer as a :class:`pipeline.kafka.clients.HeaderKey` and is forwarded byte
for byte; any other key that cannot be encoded is sent with its bad characters
written as ``\\xNN`` / ``\\uNNNN`` escapes. kafka-python's producer cannot send a
null header value nor a record with neither key nor value (other clients
can produce both): a null header value is forwarded empty, and a record
with neither is forwarded with an empty value.

No dead letter is larger than ``kafka.dlq_max_message_bytes`` (the DLQ topic's
``max.message.bytes``) or the producer's ``max_request_size``, less
:data:`MARGIN`. A rejected value near the broker's limit plus these headers
can be larger; sending it failed every time, so the checkpoint that checks the
send failed, and the job retried from its last commit forever. Such a record is
sent with its value cut to fit, and ``rollcast-truncated: true``,
``rollcast-original-size`` (bytes) and ``rollcast-value-sha256`` (hex) of the
whole value; the source headers say where the whole record still is. A key too
big to fit beside rollcast's headers is cut too (``rollcast-original-key-size``),
and original headers that do not fit beside the key are dropped from the last
(``rollcast-original-headers``: how many the record had). For rejected Arrow rows
the size and hash are those of the rows' stream; the source message holds them.
The size is the record's as kafka-python measures it before compression; a
batch of several dead letters over the limit is split by the producer itself.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from kafka.record.default_records import DefaultRecordBatchBuilder, size_of_varint

from pipeline.config import KafkaSettings
from pipeline.ingest import telemetry as metrics
from pipeline.ingest.decode import Rejected

log = logging.getLogger(__name__)

DLQ_MAX_MESSAGE_BYTES = KafkaSettings.model_fields["dlq_max_message_bytes"].default
# bytes kept free below the limit, for what kafka-python's size bound leaves out (a codec's framing, a broker's
# own accounting)
MARGIN = 512


class DeadLetters:
    """Sends :class:`Rejected` items to the DLQ topic; the caller flushes the producer.

    ``max_message_bytes``: the DLQ topic's limit (``kafka.dlq_max_message_bytes``). Stand-ins for the
    producer that have no kafka-python ``config`` (benchmarks, the decoder's fuzzer) leave it the only one.
    """

    def __init__(self, producer: Any, topic: str, max_message_bytes: int = DLQ_MAX_MESSAGE_BYTES):
        self.producer = producer
        self.topic = topic
        self.futures: list[Any] = []
        request = getattr(producer, "config", {}).get("max_request_size", max_message_bytes)
        self.max_bytes = min(max_message_bytes, request) - MARGIN

    def send(self, item: Rejected) -> None:
        r = item.record
        originals = [(_sendable(k), b"" if v is None else v) for k, v in r.headers or ()]
        ours = [
            ("rollcast-reason", item.reason.encode()),
            ("rollcast-error", item.detail.encode("utf-8", "backslashreplace")[:1000]),
            ("rollcast-source-topic", r.topic.encode()),
            ("rollcast-source-partition", str(r.partition).encode()),
            ("rollcast-source-offset", str(r.offset).encode()),
        ]
        if item.value is not None:
            ours.append(("rollcast-rows", str(item.rows).encode()))
        value = item.value if item.value is not None else r.value
        if value is None and r.key is None:  # kafka-python's producer refuses a record of neither
            value = b""
        key, value, headers = r.key, value, originals + ours
        if _size(key, value, headers) > self.max_bytes:
            key, value, headers = self.cut(key, value, originals, ours)
            log.warning("rejected %s[%d]@%d sent to the DLQ cut to fit in %d bytes (kafka.dlq_max_message_bytes "
                        "less a margin)", r.topic, r.partition, r.offset, self.max_bytes)
        self.futures.append(self.producer.send(self.topic, value=value, key=key, headers=headers))
        metrics.REJECTED.labels(reason=item.reason).inc(item.rows)
        log.debug("rejected %s[%d]@%d: %s: %s", r.topic, r.partition, r.offset, item.reason, item.detail)

    def cut(self, key: bytes | None, value: bytes | None, originals: list, ours: list) -> tuple[Any, Any, list]:
        """``key``, ``value`` and headers cut to fit ``max_bytes``: rollcast's headers whole, then as much of
        the key, of the original headers (whole ones, in order) and of the value as fits, in that order."""
        whole = value or b""
        ours = [*ours, ("rollcast-truncated", b"true"), ("rollcast-original-size", str(len(whole)).encode()),
                ("rollcast-value-sha256", hashlib.sha256(whole).hexdigest().encode())]
        if key is not None and _size(key, b"", ours) > self.max_bytes:
            ours.append(("rollcast-original-key-size", str(len(key)).encode()))
            key = key[: len(key) - (_size(key, b"", ours) - self.max_bytes)]
        if originals and _size(key, b"", originals + ours) > self.max_bytes:
            ours.append(("rollcast-original-headers", str(len(originals)).encode()))
            count_grows = size_of_varint(len(originals) + len(ours)) - size_of_varint(len(ours))
            room = self.max_bytes - _size(key, b"", ours) - count_grows
            kept = 0
            while kept < len(originals) and _header_size(*originals[kept]) <= room:
                room -= _header_size(*originals[kept])
                kept += 1
            originals = originals[:kept]
        headers = originals + ours
        over = _size(key, whole, headers) - self.max_bytes
        if value is not None and over > 0:
            value = whole[: max(0, len(whole) - over)]
        return key, value, headers


def _size(key: bytes | None, value: bytes | None, headers: list) -> int:
    """The bytes of a batch of this one record, as kafka-python bounds them (its producer's own size check)."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


def _header_size(key: str, value: bytes) -> int:
    n = len(key.encode("utf-8"))
    return size_of_varint(n) + n + size_of_varint(len(value)) + len(value)


def _sendable(key: str) -> str:
    """A header key the producer can encode (a :class:`~pipeline.kafka.clients.HeaderKey` encodes itself)."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return str.encode(key, "utf-8", "backslashreplace").decode("utf-8")
    return key
