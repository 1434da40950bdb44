"""Reading a topic from its beginning to its end, outside any consumer group (``query``, ``scores``, the demo)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipeline.config import Settings


def open_at_beginning(settings: Settings, topic: str, keys: list[str] | None = None) -> Any | None:
    """A consumer outside any group, assigned at the beginning to the partitions of ``topic`` that
    ``keys`` hash to (Kafka's murmur2 partitioner; every partition when ``keys`` is None). None when
    the topic does not exist."""
    from kafka import TopicPartition

    from pipeline.kafka.clients import make_consumer
    from pipeline.kafka.partitioning import partition_for

    consumer = make_consumer(settings, None)
    parts = sorted(consumer.partitions_for_topic(topic) or [])
    if not parts:
        consumer.close()
        return None
    if keys is None:
        tps = [TopicPartition(topic, p) for p in parts]
    else:
        tps = sorted({TopicPartition(topic, partition_for(k, len(parts))) for k in keys})
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return consumer


# the longest read_to_end waits, once quiet, for partitions whose reported end it has not reached
UNREACHED_END_S = 10.0


def read_to_end(consumer: Any, idle_ms: int, on_value: Callable[[bytes], object]) -> None:
    """Pass the value of every record of the consumer's assigned partitions to ``on_value``, from
    where it stands to the end: until each partition has been read to the end offset it had when
    the read began and no record came for ``idle_ms``.

    The end offsets alone would do against Kafka; the idle gap is there because some Kafka-protocol
    brokers (tansu) report them wrongly when a batch holds several records. An end that is never
    reached (a broker that reports it too high) is waited for at most ``UNREACHED_END_S`` of quiet.
    """
    tps = list(consumer.assignment())
    ends = consumer.end_offsets(tps) if tps else {}
    quiet_since = None  # from the end of the first poll: connecting and seeking are not quiet time
    while True:
        batch = consumer.poll(timeout_ms=200)
        now = time.monotonic()
        if batch or quiet_since is None:
            quiet_since = now
        for records in batch.values():
            for rec in records:
                on_value(rec.value)
        quiet_ms = (now - quiet_since) * 1000
        if quiet_ms >= idle_ms and (quiet_ms >= UNREACHED_END_S * 1000
                                    or all(consumer.position(tp) >= end for tp, end in ends.items())):
            return
