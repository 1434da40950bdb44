"""Rebalances against the real broker, in one process: a partition kept through a join and a leave keeps
(or rebuilds) its open windows, under kafka-python's eager protocol and the cooperative one."""

from __future__ import annotations

import threading
import time

import pytest
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor

from pipeline.config import load_settings
from pipeline.ingest.ingestor import Ingestor
from pipeline.kafka.clients import make_consumer, make_producer
from pipeline.store import HistoryStore
from tests.support.ingest import (
    INGEST_ENV,
    assert_frames_equal,
    make_observations,
    produce,
    progress_positions,
    reference,
    window_faults,
)

pytestmark = pytest.mark.slow


class Member:
    """One ingest consumer of the group: a real consumer and its Ingestor, polled by the test's thread."""

    def __init__(self, s, assignor):
        self.consumer = make_consumer(s, s.groups.ingest, partition_assignment_strategy=[assignor])
        self.producer = make_producer(s)
        self.ingestor = Ingestor(s, self.consumer, self.producer, checkpoint_interval_s=0.0)
        self.consumer.subscribe([s.topics.observations], listener=self.ingestor.listener())

    def poll(self) -> None:
        self.ingestor.submit(self.consumer.poll(timeout_ms=50))
        self.ingestor.maybe_checkpoint()
        self.ingestor.raise_failed()

    def owned(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment()}

    def leave(self) -> None:
        self.ingestor.drain()
        self.ingestor.checkpoint()
        self.consumer.close(autocommit=False)  # revokes (a checkpoint) and leaves the group
        self.ingestor.close()
        self.producer.close()


def _poll_into(member: Member, errors: list[BaseException]) -> None:
    try:
        member.poll()
    except BaseException as e:  # noqa: BLE001 - raised in the test's thread by _until
        errors.append(e)


def _until(members: list[Member], done, what: str, timeout_s: float = 120) -> None:
    """Poll every member, each in a thread of its own as separate processes would, until ``done()``.

    Not one after the other in this thread: kafka-python 3.0's ``poll()`` waits inside a group join until
    the join completes, beyond its timeout, and the join waits for the other member's next poll."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        errors: list[BaseException] = []

        threads = [threading.Thread(target=_poll_into, args=(m, errors)) for m in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        if errors:
            raise errors[0]


@pytest.mark.parametrize(
    "assignor", [RangePartitionAssignor, CooperativeStickyAssignor], ids=["eager", "cooperative"]
)
def test_open_windows_of_a_kept_partition_survive_a_join_and_a_leave(settings3, test_env, assignor):
    s = load_settings(env={**test_env, **INGEST_ENV})
    store = HistoryStore(s)
    first = make_observations(2_000, series=6, seed=18)
    sent = produce(s, first)
    ends = {p: max(off for q, off, _ in sent if q == p) + 1 for p in range(3)}
    a = Member(s, assignor)
    b = None
    try:
        _until(
            [a], lambda: progress_positions(store, s.topics.observations, 3) == ends, "A to read everything"
        )
        assert sum(r.state.n_open for r in a.ingestor.runs.values()) > 0  # windows are open
        b = Member(s, assignor)
        _until(
            [a, b], lambda: b.owned() and a.owned() and not a.owned() & b.owned(), "B to share the partitions"
        )
        kept = a.owned()
        b.leave()
        b = None
        _until([a], lambda: a.owned() == {0, 1, 2}, "A to own every partition again")
        t_end = max(o["ts"] for o in first) + 5_000
        series = sorted({o["series"] for o in first})
        sent += produce(s, [{"series": x, "ts": t_end + i, "value": 1.0} for i, x in enumerate(series)])
        ends = {p: max(off for q, off, _ in sent if q == p) + 1 for p in range(3)}
        _until([a], lambda: progress_positions(store, s.topics.observations, 3) == ends, "A to read the rest")
        a.ingestor.checkpoint()
    finally:
        for m in (a, b):
            if m is not None:
                m.leave()
    want = reference(sent)
    got = store.read()
    assert kept and kept != {0, 1, 2}
    assert window_faults(got, want) == {"lost": 0, "duplicated": 0, "wrong": 0, "unexpected": 0}
    assert_frames_equal(got, want)


def test_a_lost_partition_is_dropped_without_a_checkpoint(settings3, test_env):
    """kafka-python's on_partitions_lost (the group evicted this consumer): another consumer may own the
    partitions already, so their state is dropped and no progress record is written for them."""
    s = load_settings(env={**test_env, **INGEST_ENV})
    store = HistoryStore(s)
    sent = produce(s, make_observations(1_000, series=6, seed=19))
    a = Member(s, RangePartitionAssignor)
    try:
        _until([a], lambda: a.ingestor.messages == len(sent), "A to read everything")
        a.ingestor.drain()
        before = progress_positions(store, s.topics.observations, 3)
        a.ingestor.listener().on_partitions_lost(a.consumer.assignment())
        assert a.ingestor.runs == {} and a.ingestor.rebalancing
        a.ingestor.checkpoint()  # nothing left to checkpoint
        assert progress_positions(store, s.topics.observations, 3) == before
    finally:
        a.consumer.close(autocommit=False)
        a.ingestor.close()
        a.producer.close()
