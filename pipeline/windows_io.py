"""Closed windows on the ``windows`` topic: Arrow IPC stream messages.

Each message holds the windows of series that all map to the message's
partition under kafka-python's DefaultPartitioner (murmur2 of the UTF-8
series id), so a forecast consumer owning a partition owns whole series.
Consumers decode a message with :func:`decode_windows`; a restart of ingest
may repeat a (series, window_start) row, always with the same values, so drop
repeats by that key.

The messages of one batch (one ingest checkpoint) carry the header
``rollcast-batch: <id>/<partitions>``: an id of the batch and every partition
it has messages in. A batch's partitions often arrive in different fetches
(a broker applies a produce partition by partition; partitions led by other
brokers are fetched separately); a consumer that owns several of them can
wait for the rest (:func:`announced_missing`) and forecast the batch at once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.kafka.headers import ARROW_HEADERS
from pipeline.kafka.partitioning import partition_for

log = logging.getLogger("rollcast.forecast")

HEADERS = ARROW_HEADERS
BATCH_HEADER = "rollcast-batch"


def encode_windows(table: pa.Table | pl.DataFrame) -> bytes:
    """One Arrow IPC stream message holding ``table``."""
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_windows(value: bytes) -> pa.Table:
    """The windows in one message of the ``windows`` topic (columns of the Window contract)."""
    return pa.ipc.open_stream(value).read_all()


class KeyPartitions:
    """The partition of each series key under kafka-python's DefaultPartitioner, memoised.

    murmur2 is pure Python in kafka-python (a few microseconds a key); producers that send
    thousands of keyed messages per batch look the partition up here and pass it to ``send``,
    which then skips its partitioner. Same placement as sending with the key alone.
    """

    def __init__(self, partitions: int, max_keys: int = 1_000_000):
        self.partitions = partitions
        self.max_keys = max_keys
        self._cache: dict[str, int] = {}

    def __getitem__(self, series: str) -> int:
        p = self._cache.get(series)
        if p is None:
            if len(self._cache) >= self.max_keys:
                self._cache.clear()
            p = self._cache[series] = partition_for(series, self.partitions)
        return p


def announced_missing(records: Iterable[tuple[int, Any]], owned: set[int]) -> set[tuple[str, int]]:
    """(batch id, partition) announced by the ``rollcast-batch`` headers of ``records`` (pairs of
    partition and consumer record) in a partition of ``owned`` but not among ``records``.
    Records without the header, or with one that does not parse, announce nothing."""
    announced: set[tuple[str, int]] = set()
    seen: set[tuple[str, int]] = set()
    for partition, record in records:
        for key, value in record.headers or ():
            if key != BATCH_HEADER:
                continue
            batch, _, parts = bytes(value).decode("utf-8", "replace").partition("/")
            seen.add((batch, partition))
            announced.update((batch, int(p)) for p in parts.split(",") if p.isdigit() and int(p) in owned)
    return announced - seen


class WindowRouter:
    """Groups closed windows by the ``windows`` partition of their series."""

    def __init__(self, partitions: int, max_rows: int = 100_000):
        self.partitions = partitions
        self.max_rows = max_rows
        self._parts = KeyPartitions(partitions)

    def messages(self, windows: pl.DataFrame) -> Iterator[tuple[int, bytes]]:
        """``(partition, Arrow IPC bytes)`` for every group of at most ``max_rows`` windows."""
        if windows.height == 0:
            return
        # In Arrow, without polars' thread pool: cheaper than a group_by and a conversion per group, on the
        # way from a closed window to its forecast (figures in BENCHMARKS.md).
        table = windows.to_arrow()
        series = pc.dictionary_encode(table.column("series").combine_chunks())
        of_key = np.array([self._parts[s] for s in series.dictionary.to_pylist()], dtype=np.int64)
        partition = of_key[series.indices.to_numpy(zero_copy_only=False)]
        found, first = np.unique(partition, return_index=True)
        for p in found[np.argsort(first)].tolist():  # partitions in the order of their first row
            rows = np.flatnonzero(partition == p)  # the partition's rows, in their order
            for start in range(0, len(rows), self.max_rows):
                yield p, encode_windows(table.take(rows[start:start + self.max_rows]))

    def batch(self, windows: pl.DataFrame) -> list[tuple[int, bytes, list[tuple[str, bytes]]]]:
        """``(partition, Arrow IPC bytes, headers)`` of every message of one batch: :data:`HEADERS` plus
        ``rollcast-batch`` naming a new batch id and all the partitions the batch reaches."""
        messages = list(self.messages(windows))
        parts = ",".join(str(p) for p in sorted({p for p, _ in messages}))
        headers = [*HEADERS, (BATCH_HEADER, f"{os.urandom(8).hex()}/{parts}".encode())]
        return [(p, value, headers) for p, value in messages]


def complete_batch(consumer: Any, batch: dict, wait_s: float, waits: Any = None) -> None:
    """Add to ``batch`` (a poll's records) what the consumer has fetched since, then the rest of every windows
    batch whose ``rollcast-batch`` headers announce partitions this consumer owns but ``batch`` lacks, for up
    to ``wait_s``. A checkpoint's partitions often land in different fetches; forecasting each fetch on its
    own runs the inference and the messages twice and delays the second half by the first."""

    from pipeline.kafka.clients import poll_checked, poll_promptly

    def extend(more: dict) -> None:
        for tp, records in more.items():
            batch.setdefault(tp, []).extend(records)

    extend(poll_checked(consumer, 0))
    if wait_s <= 0:
        return
    owned = {tp.partition for tp in consumer.assignment()}
    deadline, waited = time.monotonic() + wait_s, False
    while announced_missing(((tp.partition, r) for tp, records in batch.items() for r in records), owned):
        left = deadline - time.monotonic()
        if left <= 0:
            if waits is not None:
                waits.labels("timeout").inc()
            log.debug("windows batch still incomplete after %.0f ms; forecasting what arrived", wait_s * 1000)
            return
        waited = True
        extend(poll_promptly(consumer, max(1, math.ceil(left * 1000))))
    if waited and waits is not None:
        waits.labels("complete").inc()
