"""The ingest checkpoint (``pipeline/ingest/checkpoint.py``) against the real broker and a real history
store (a local directory, and a prefix on the S3 server): its steps run in the order its docstring
numbers (windows topic, flush, store write with the progress record, then the commit), nothing is
committed when a store write fails, and the progress record holds the position, the event time and
the safe offset.

The consumer is scripted: :class:`RecordingConsumer` is not a Kafka consumer, it only records the
offsets the checkpoint asks it to commit (the checkpoint calls nothing else on it), so that the commit's
place among the other steps can be seen. The producer and the store are real; :class:`Recorded` passes
their calls through and notes each one.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from kafka.structs import TopicPartition

from pipeline.config import Settings
from pipeline.errors import StoreUnavailable
from pipeline.ingest.checkpoint import Checkpoint, PartitionRun
from pipeline.kafka.clients import make_producer
from pipeline.store import HistoryStore, Progress
from pipeline.windows import TumblingWindow, WindowState
from pipeline.windows_io import WindowRouter, decode_windows
from tests.support import read_topic

SPEC = TumblingWindow(duration_ms=1000, grace_ms=0)


class Recorded:
    """``target`` with every method call noted in ``calls`` as ``"name.method"`` before it runs."""

    def __init__(self, target: Any, name: str, calls: list[str]) -> None:
        self._target, self._name, self._calls = target, name, calls

    def __getattr__(self, attr: str) -> Any:
        method = getattr(self._target, attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append(f"{self._name}.{attr}")
            return method(*args, **kwargs)

        return call


class RecordingConsumer:
    """A scripted consumer: records what it is asked to commit, talks to no broker."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.committed: list[dict[TopicPartition, int]] = []

    def commit(self, offsets: dict, timeout_ms: int | None = None) -> None:
        self.calls.append("consumer.commit")
        self.committed.append({tp: om.offset for tp, om in offsets.items()})

    def commit_async(self, offsets: dict) -> None:
        self.calls.append("consumer.commit_async")
        self.committed.append({tp: om.offset for tp, om in offsets.items()})


def run_of(series: str, ts: list[int], first_offset: int) -> PartitionRun:
    """A partition that saw ``ts`` of ``series`` at consecutive offsets; its closed windows are pending."""
    state = WindowState(SPEC)
    offsets = list(range(first_offset, first_offset + len(ts)))
    events = pl.DataFrame({"series": [series] * len(ts), "ts": ts, "value": [float(t) for t in ts],
                           "offset": offsets, "seq": offsets})
    run = PartitionRun(state, position=offsets[-1] + 1)
    run.closed.append(state.add(events, now=0.0).closed)
    return run


def runs() -> dict[int, PartitionRun]:
    # partition 0: windows [0, 1000) and [1000, 2000) close at ts 2500, [2000, 3000) stays open from offset 13
    # partition 1: [0, 1000) closes at ts 1200, [1000, 2000) stays open from offset 6
    # partition 2: nothing read yet (position None): neither stored nor committed
    return {0: run_of("a", [100, 900, 1500, 2500], 10), 1: run_of("b", [300, 1200], 5), 2: PartitionRun(WindowState(SPEC))}


def checkpoint(settings: Settings, store: Any, calls: list[str]) -> tuple[Checkpoint, RecordingConsumer]:
    consumer = RecordingConsumer(calls)
    producer = Recorded(make_producer(settings), "producer", calls)
    ckpt = Checkpoint(consumer, producer, store, settings.topics.observations, settings.topics.windows,
                      WindowRouter(settings.kafka.partitions), timeout_s=30)
    return ckpt, consumer


def collapsed(calls: list[str]) -> list[str]:
    return [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]


def test_steps_run_in_order_and_leave_the_progress_record(settings: Settings, store_location: str) -> None:
    store = HistoryStore(store_location)
    calls: list[str] = []
    ckpt, consumer = checkpoint(settings, Recorded(store, "store", calls), calls)
    partitions = runs()

    ckpt.commit(partitions)

    # 1. windows topic, 2. flush, 3. store write per partition that read something, 5. one commit, last
    assert collapsed(calls) == ["producer.send", "producer.flush", "store.write_checkpoint", "consumer.commit"]
    assert calls.count("store.write_checkpoint") == 2 and calls.count("consumer.commit") == 1
    topic = settings.topics.observations
    # 4. the safe offset: the earliest event of a still-open window, else the position
    assert consumer.committed == [{TopicPartition(topic, 0): 13, TopicPartition(topic, 1): 6}]
    assert store.recover(topic, 0) == Progress(position=14, max_ts=2500, safe=13)
    assert store.recover(topic, 1) == Progress(position=7, max_ts=1200, safe=6)
    assert store.recover(topic, 2) is None
    assert all(not r.closed for r in partitions.values())

    want = [("a", 0), ("a", 1000), ("b", 0)]
    assert store.read().sort("series", "window_start").select("series", "window_start").rows() == want
    sent = calls.count("producer.send")
    records = read_topic(settings, settings.topics.windows, sent, timeout=30)
    assert len(records) == sent
    got = pl.concat([pl.from_arrow(decode_windows(r.value)) for r in records]).sort("series", "window_start")
    assert got.select("series", "window_start").rows() == want
    assert got["count"].to_list() == [2, 1, 1]


def test_nothing_is_committed_when_a_store_write_fails(settings: Settings, store_location: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = HistoryStore(store_location)
    topic = settings.topics.observations
    create = store._create

    def failing_create(rel: str, data: bytes) -> bool:
        if rel.startswith(f"_progress/{topic}-1/"):  # partition 1's commit point
            raise OSError("no space left on device")
        return create(rel, data)

    monkeypatch.setattr(store, "_create", failing_create)
    calls: list[str] = []
    ckpt, consumer = checkpoint(settings, Recorded(store, "store", calls), calls)
    partitions = runs()

    with pytest.raises(StoreUnavailable, match="no space left"):
        ckpt.commit(partitions)

    assert consumer.committed == [] and "consumer.commit" not in calls
    # partition 0's write went through before partition 1's failed: durable, yet not committed either
    assert store.recover(topic, 0) == Progress(position=14, max_ts=2500, safe=13)
    assert store.recover(topic, 1) is None
    assert store.read().select("series", "window_start").sort("series", "window_start").rows() == [("a", 0), ("a", 1000)]
    assert partitions[1].closed, "the failed partition keeps its closed windows"


def test_a_fenced_partition_is_dropped_stored_nowhere_and_not_committed(settings: Settings,
                                                                        store_location: str) -> None:
    """This process claimed partitions 0 and 1, froze, and another process claimed partition 1 meanwhile (as
    an assignment does). The checkpoint after the thaw stores and commits partition 0 only; partition 1's
    windows are in no Parquet file, its state here is dropped, and the ingestor is told (``fenced``)."""
    store = HistoryStore(store_location)
    topic = settings.topics.observations
    calls: list[str] = []
    ckpt, consumer = checkpoint(settings, store, calls)
    partitions = runs()
    for p, run in partitions.items():
        run.lease = store.claim(topic, p).lease
    HistoryStore(store_location).claim(topic, 1)  # the other process

    ckpt.commit(partitions)

    assert consumer.committed == [{TopicPartition(topic, 0): 13}]
    assert set(partitions) == {0, 2} and ckpt.fenced == {1}
    assert store.read().select("series", "window_start").rows() == [("a", 0), ("a", 1000)]
    assert store.progress(topic, 1) is None
