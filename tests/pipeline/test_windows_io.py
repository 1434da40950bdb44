"""Windows messages: routing by partition and the batch header that lets a consumer wait for the rest."""

from __future__ import annotations

import time
from types import SimpleNamespace

import polars as pl
from kafka import TopicPartition

from pipeline.kafka.partitioning import partition_for
from pipeline.windows import WINDOW_SCHEMA
from pipeline.windows_io import (
    BATCH_HEADER,
    HEADERS,
    WindowRouter,
    announced_missing,
    complete_batch,
    decode_windows,
)
from tests.support.forecast import make_windows


def _windows(series: list[str]) -> pl.DataFrame:
    n = len(series)
    return pl.DataFrame(
        {"series": series, "window_start": [0] * n, "window_end": [60_000] * n, "count": [1] * n,
         "first": [1.0] * n, "last": [1.0] * n, "min": [1.0] * n, "max": [1.0] * n, "mean": [1.0] * n,
         "sum": [1.0] * n},
        schema=WINDOW_SCHEMA,
    )


def _record(headers: list[tuple[str, bytes]] | None) -> SimpleNamespace:
    return SimpleNamespace(headers=headers)


def test_a_batch_names_itself_and_every_partition_it_reaches():
    series = [f"s{i}" for i in range(40)]
    router = WindowRouter(4, max_rows=7)
    messages = router.batch(_windows(series))
    parts = {p for p, _, _ in messages}
    assert parts == {partition_for(s, 4) for s in series} and len(messages) > len(parts)  # split by max_rows
    (header,) = {dict(h)[BATCH_HEADER] for _, _, h in messages}  # one batch id for all its messages
    batch, listed = header.decode().split("/")
    assert len(batch) == 16 and {int(p) for p in listed.split(",")} == parts
    assert all(h[: len(HEADERS)] == HEADERS for _, _, h in messages)
    assert sorted(s for _, v, _ in messages for s in decode_windows(v).column("series").to_pylist()) == sorted(series)
    for p, value, _ in messages:  # every row of a message is in that message's partition, rows in input order
        rows = decode_windows(value).column("series").to_pylist()
        assert {partition_for(s, 4) for s in rows} == {p} and rows == sorted(rows, key=series.index)
    # the next batch gets another id
    assert dict(router.batch(_windows(series))[0][2])[BATCH_HEADER] != header


def test_announced_missing_lists_owned_partitions_not_yet_read():
    [(p0, _, h0), *rest] = WindowRouter(4).batch(_windows([f"s{i}" for i in range(40)]))
    batch = dict(h0)[BATCH_HEADER].decode().split("/")[0]
    others = {p for p, _, _ in rest}
    assert others and p0 not in others
    assert announced_missing([(p0, _record(h0))], owned={0, 1, 2, 3}) == {(batch, p) for p in others}
    # partitions another consumer owns are not waited for
    assert announced_missing([(p0, _record(h0))], owned={p0}) == set()
    # the whole batch read: nothing missing
    assert announced_missing([(p0, _record(h0)), *((p, _record(h)) for p, _, h in rest)], owned={0, 1, 2, 3}) == set()
    # records without the header (older producers) or with an unreadable one announce nothing
    assert announced_missing([(0, _record(None)), (1, _record(HEADERS))], owned={0, 1, 2, 3}) == set()
    junk = [(0, _record([(BATCH_HEADER, b"\xff\xfe")])), (1, _record([(BATCH_HEADER, b"id/x,,-1")]))]
    assert announced_missing(junk, owned={0, 1, 2, 3}) == set()


class ScriptedConsumer:
    """A scripted consumer, not Kafka (see tests/conftest.py): stands in for the consumer in
    :func:`complete_batch`, which only polls and asks for the assignment. Each poll hands out the next
    scripted fetch, or, with none left, waits out its timeout and returns nothing, so a batch split
    across fetches happens at will."""

    def __init__(self, owned: set[int], fetches: list[dict]):
        self.owned, self.fetches, self.timeouts = owned, fetches, []

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("windows", p) for p in self.owned}

    def poll(self, timeout_ms: int) -> dict:
        self.timeouts.append(timeout_ms)
        if self.fetches:
            return self.fetches.pop(0)
        time.sleep(timeout_ms / 1000)
        return {}


def _batch_records(series: list[str]) -> dict[TopicPartition, list[SimpleNamespace]]:
    """One windows batch as consumer records (only headers matter here), by partition."""
    out: dict[TopicPartition, list[SimpleNamespace]] = {}
    for p, value, headers in WindowRouter(4).batch(make_windows(series, 1)):
        out.setdefault(TopicPartition("windows", p), []).append(SimpleNamespace(headers=headers, value=value))
    return out


def test_a_batch_split_across_fetches_is_completed_before_forecasting() -> None:
    parts = _batch_records([f"s{i}" for i in range(40)])
    first, *rest = parts
    assert rest
    # the rest arrives two polls later: the job waits for it
    consumer = ScriptedConsumer({0, 1, 2, 3}, [{}, {}, {tp: parts[tp] for tp in rest}])
    batch = {first: list(parts[first])}
    complete_batch(consumer, batch, wait_s=5)
    assert batch == parts and consumer.timeouts[0] == 0 and len(consumer.timeouts) == 3
    # a whole batch: one look at what is already fetched, no waiting
    consumer = ScriptedConsumer({0, 1, 2, 3}, [])
    batch = {tp: list(records) for tp, records in parts.items()}
    complete_batch(consumer, batch, wait_s=5)
    assert batch == parts and consumer.timeouts == [0]
    # partitions owned by another consumer are not waited for
    consumer = ScriptedConsumer({first.partition}, [])
    complete_batch(consumer, {first: list(parts[first])}, wait_s=5)
    assert consumer.timeouts == [0]


def test_a_batch_whose_rest_never_comes_is_forecast_after_the_wait() -> None:
    parts = _batch_records([f"s{i}" for i in range(40)])
    first = next(iter(parts))
    consumer = ScriptedConsumer({0, 1, 2, 3}, [])
    batch = {first: list(parts[first])}
    t0 = time.monotonic()
    complete_batch(consumer, batch, wait_s=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2
    assert batch == {first: parts[first]}
    # batch_wait_ms = 0: what is fetched now, no wait
    consumer = ScriptedConsumer({0, 1, 2, 3}, [])
    complete_batch(consumer, {first: list(parts[first])}, wait_s=0)
    assert consumer.timeouts == [0]
