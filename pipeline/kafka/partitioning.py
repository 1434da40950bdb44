"""Which partition a keyed message goes to: the rule every rollcast producer and consumer shares.

kafka-python's DefaultPartitioner, librdkafka's ``murmur2_random`` and the Java client all put a keyed
message on murmur2(key) mod partitions, so a forecast consumer that owns a partition owns whole series.
"""

from __future__ import annotations

from kafka.partitioner.default import murmur2


def partition_for(series: str, partitions: int) -> int:
    """The partition kafka-python's DefaultPartitioner picks for key ``series``."""
    return (murmur2(series.encode()) & 0x7FFFFFFF) % partitions
