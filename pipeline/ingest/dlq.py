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
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.ingest import telemetry as metrics
from pipeline.ingest.decode import Rejected

log = logging.getLogger(__name__)


class DeadLetters:
    """Sends :class:`Rejected` items to the DLQ topic; the caller flushes the producer."""

    def __init__(self, producer: Any, topic: str):
        self.producer = producer
        self.topic = topic
        self.futures: list[Any] = []

    def send(self, item: Rejected) -> None:
        r = item.record
        headers = [
            *((_sendable(k), b"" if v is None else v) for k, v in r.headers or ()),
            ("rollcast-reason", item.reason.encode()),
            ("rollcast-error", item.detail.encode("utf-8", "backslashreplace")[:1000]),
            ("rollcast-source-topic", r.topic.encode()),
            ("rollcast-source-partition", str(r.partition).encode()),
            ("rollcast-source-offset", str(r.offset).encode()),
        ]
        if item.value is not None:
            headers.append(("rollcast-rows", str(item.rows).encode()))
        value = item.value if item.value is not None else r.value
        if value is None and r.key is None:  # kafka-python's producer refuses a record of neither
            value = b""
        self.futures.append(self.producer.send(self.topic, value=value, key=r.key, headers=headers))
        metrics.REJECTED.labels(reason=item.reason).inc(item.rows)
        log.debug("rejected %s[%d]@%d: %s: %s", r.topic, r.partition, r.offset, item.reason, item.detail)


def _sendable(key: str) -> str:
    """A header key the producer can encode (a :class:`~pipeline.kafka.clients.HeaderKey` encodes itself)."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return str.encode(key, "utf-8", "backslashreplace").decode("utf-8")
    return key
