"""The forecast job's checkpoint (models.serving.checkpoint): the order of its steps, without a broker.

The history store is a real one (a local directory). The consumer is scripted (``ScriptedConsumer``: an
assignment, and a record of every seek and commit); the partition state is a small real object with the
scorer's save/load/drop surface (``Seen``). Records are stand-ins holding an offset.
"""

from __future__ import annotations

import json
import threading
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka.structs import OffsetAndMetadata, TopicPartition

from models.serving.checkpoint import ForecastCheckpoint
from pipeline.config import Settings, load_settings
from pipeline.errors import BrokerUnavailable, StoreUnavailable
from pipeline.store import HistoryStore

Record = namedtuple("Record", "offset")
TOPIC = "windows"


def tp(partition: int) -> TopicPartition:
    return TopicPartition(TOPIC, partition)


def batch(**offsets: range) -> dict[TopicPartition, list[Record]]:
    """``batch(p0=range(0, 5))``: records of partition 0 at offsets 0-4."""
    return {tp(int(name[1:])): [Record(o) for o in r] for name, r in offsets.items()}


def commits(b: dict[TopicPartition, list[Record]]) -> dict[TopicPartition, OffsetAndMetadata]:
    """What the job commits after a batch: the offset after each partition's last record."""
    return {t: OffsetAndMetadata(records[-1].offset + 1, "", -1) for t, records in b.items()}


class Seen:
    """A partition state (:class:`models.serving.checkpoint.PartitionState`): windows seen per partition."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def add(self, b: dict[TopicPartition, list[Record]]) -> None:
        for t, records in b.items():
            self.seen[t.partition] = self.seen.get(t.partition, 0) + len(records)

    def snapshot(self, partition: int, offset: int) -> Callable[[], bytes]:
        data = json.dumps({"offset": offset, "seen": self.seen.get(partition, 0)}).encode()
        return lambda: data

    def load(self, partition: int, data: bytes) -> int | None:
        saved = json.loads(data)
        self.seen[partition] = saved["seen"]
        return saved["offset"]

    def drop(self, partition: int) -> None:
        self.seen.pop(partition, None)


class ScriptedConsumer:
    """Scripted stand-in for kafka-python's consumer: ``assigned`` partitions; seeks and commits recorded.
    ``on_commit(offsets)`` runs at each commit, before it is recorded."""

    def __init__(self, *assigned: int) -> None:
        self.assigned = {tp(p) for p in assigned}
        self.seeks: list[tuple[int, int]] = []
        self.commits: list[dict[int, int]] = []
        self.timeouts: list[int | None] = []
        self.on_commit: Any = None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition.partition, offset))

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        self.seeks.extend((p.partition, 0) for p in partitions)

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], timeout_ms: int | None = None) -> None:
        if self.on_commit is not None:
            self.on_commit(offsets)
        self.commits.append({t.partition: om.offset for t, om in offsets.items()})
        self.timeouts.append(timeout_ms)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Saves fall due only when flushed (``scoring.checkpoint_s`` of an hour)."""
    return load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_TOPICS__WINDOWS": TOPIC,
                              "ROLLCAST_SCORING__CHECKPOINT_S": "3600",
                              "ROLLCAST_OBSERVABILITY__SHUTDOWN_TIMEOUT_S": "7"})


def saved(settings: Settings, checkpoint: ForecastCheckpoint, partition: int) -> dict | None:
    data = HistoryStore(settings).read_state(checkpoint.name(partition))
    return None if data is None else json.loads(data)


def test_each_state_is_saved_before_the_offsets_it_covers_are_committed(settings: Settings) -> None:
    consumer, state = ScriptedConsumer(0, 1), Seen()
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    seen_at_commit: list[dict[int, dict | None]] = []
    consumer.on_commit = lambda offsets: seen_at_commit.append(
        {t.partition: saved(settings, checkpoint, t.partition) for t in offsets})

    first, second = batch(p0=range(0, 5)), batch(p0=range(5, 10), p1=range(20, 23))
    for b in (first, second):
        checkpoint.begin(b)
        state.add(b)
        checkpoint.processed(commits(b))
    assert consumer.commits == [] and saved(settings, checkpoint, 0) is None  # not due yet

    checkpoint.flush(wait=True)
    # one commit of the offset after each partition's last processed record; when it was made, the store
    # already held each partition's state, naming that same offset
    assert consumer.commits == [{0: 10, 1: 23}]
    assert seen_at_commit == [{0: {"offset": 10, "seen": 10}, 1: {"offset": 23, "seen": 3}}]
    assert consumer.timeouts == [7000]
    checkpoint.flush(wait=True)  # nothing processed since: no save, no commit
    assert consumer.commits == [{0: 10, 1: 23}]


def test_without_scoring_every_batch_is_committed_and_nothing_is_saved(settings: Settings) -> None:
    consumer = ScriptedConsumer(0, 1)
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: None)
    for b in (batch(p0=range(0, 5)), batch(p1=range(3, 4))):
        checkpoint.begin(b)
        checkpoint.processed(commits(b))
    assert consumer.commits == [{0: 5}, {1: 4}]
    assert saved(settings, checkpoint, 0) is None and saved(settings, checkpoint, 1) is None


def test_nothing_is_committed_when_a_save_fails(settings: Settings) -> None:
    consumer, state = ScriptedConsumer(0, 1), Seen()
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    # a file where partition 1's record log goes: its save fails in the store (a real OSError)
    blocked = Path(settings.history_location) / "_state" / f"{checkpoint.name(1)}.log"
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"")

    b = batch(p0=range(0, 5), p1=range(20, 23))
    checkpoint.begin(b)
    state.add(b)
    checkpoint.processed(commits(b))
    with pytest.raises(StoreUnavailable):
        checkpoint.flush(wait=True)
    assert consumer.commits == []  # not partition 1's offset, nor partition 0's, whose save went through
    assert saved(settings, checkpoint, 0) == {"offset": 5, "seen": 5}
    assert blocked.is_file()


def test_a_save_waits_for_every_score_sent_and_a_score_not_acknowledged_saves_and_commits_nothing(
    settings: Settings,
) -> None:
    """Scores are sent in the background (models.serving.score_sender); the checkpoint's ``acknowledge``
    stands for its confirm: each save runs it first, and its failure stops the save and the commit."""
    consumer, state = ScriptedConsumer(0), Seen()
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    events: list[str] = []
    fail = False

    def acknowledge() -> None:
        events.append("acknowledge")
        if fail:
            raise BrokerUnavailable("scores not delivered")

    checkpoint.acknowledge = acknowledge
    consumer.on_commit = lambda offsets: events.append(f"commit {saved(settings, checkpoint, 0)}")
    first = batch(p0=range(0, 5))
    checkpoint.begin(first)
    state.add(first)
    checkpoint.processed(commits(first))
    assert events == []  # a save not due yet waits for nothing
    checkpoint.flush(wait=True)
    assert events == ["acknowledge", "commit {'offset': 5, 'seen': 5}"]

    second = batch(p0=range(5, 9))
    checkpoint.begin(second)
    state.add(second)
    checkpoint.processed(commits(second))
    fail = True
    with pytest.raises(BrokerUnavailable):
        checkpoint.flush(wait=True)
    assert saved(settings, checkpoint, 0) == {"offset": 5, "seen": 5} and consumer.commits == [{0: 5}]
    checkpoint.rewind({})  # what the loop does on the error: back to the last save
    assert consumer.seeks == [(0, 5)] and state.seen == {0: 5}

    checkpoint.begin(second)  # read again, and this time its scores are acknowledged
    state.add(second)
    checkpoint.processed(commits(second))
    checkpoint.revoked([tp(0)])  # a revoked partition is saved only once its scores are acknowledged
    assert saved(settings, checkpoint, 0) == {"offset": 5, "seen": 5}
    fail = False
    checkpoint.assigned([tp(0)])
    checkpoint.begin(second)
    state.add(second)
    checkpoint.processed(commits(second))
    checkpoint.revoked([tp(0)])
    assert saved(settings, checkpoint, 0) == {"offset": 9, "seen": 9}


def test_a_failed_batch_goes_back_to_the_last_save(settings: Settings) -> None:
    consumer, state = ScriptedConsumer(0, 1, 2), Seen()
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    saved_batch = batch(p0=range(0, 5))
    checkpoint.begin(saved_batch)
    state.add(saved_batch)
    checkpoint.processed(commits(saved_batch))
    checkpoint.flush(wait=True)
    acknowledged = batch(p0=range(5, 8), p1=range(30, 32))  # acknowledged, not saved yet
    checkpoint.begin(acknowledged)
    state.add(acknowledged)
    checkpoint.processed(commits(acknowledged))
    failed = batch(p1=range(32, 35), p2=range(40, 41), p3=range(50, 52))  # partition 3: no longer assigned
    checkpoint.begin(failed)
    state.add(failed)

    checkpoint.rewind(failed)
    # partition 0 resumes from its save (state and offset), partitions 1 and 2, never saved, from the first
    # offset processed since the last save, with their state dropped; partition 3 is left alone
    assert sorted(consumer.seeks) == [(0, 5), (1, 30), (2, 40)]
    assert state.seen == {0: 5, 3: 2}
    assert consumer.commits == [{0: 5}]
    checkpoint.flush(wait=True)  # what was rewound is no longer pending
    assert consumer.commits == [{0: 5}]


def test_revoked_partitions_are_saved_not_committed_and_their_next_owner_resumes_there(
    settings: Settings,
) -> None:
    consumer, state = ScriptedConsumer(0, 1), Seen()
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    b = batch(p0=range(0, 5), p1=range(20, 23))
    checkpoint.begin(b)
    state.add(b)
    checkpoint.processed(commits(b))

    checkpoint.revoked([tp(1)])
    assert saved(settings, checkpoint, 1) == {"offset": 23, "seen": 3}
    assert consumer.commits == [] and state.seen == {0: 5}
    checkpoint.flush(wait=True)  # partition 0 only: partition 1's commit is left to its next owner
    assert consumer.commits == [{0: 5}]

    other, other_state = ScriptedConsumer(1, 2), Seen()  # another process, given partitions 1 and 2
    other_state.seen[2] = 99  # left over: partition 2 has no save
    ForecastCheckpoint(settings, other, lambda: other_state).assigned([tp(1), tp(2)])
    assert other.seeks == [(1, 23)]
    assert other_state.seen == {1: 3}


def test_a_thawed_owner_saves_nothing_over_the_new_owners_state_and_commits_nothing(settings: Settings) -> None:
    """Process A holds partition 0, freezes past its session timeout; the group gives the partition to B, which
    claims its state, and goes on. A thaws and flushes what it processed before the pause: the store refuses the
    save, A commits nothing for the partition and drops its state; B's save stands."""
    a_consumer, a_state = ScriptedConsumer(0, 1), Seen()
    a = ForecastCheckpoint(settings, a_consumer, lambda: a_state)
    a.assigned([tp(0), tp(1)])
    first = batch(p0=range(0, 5), p1=range(0, 2))
    a.begin(first)
    a_state.add(first)
    a.processed(commits(first))
    a.flush(wait=True)
    partial = batch(p0=range(5, 7), p1=range(2, 3))  # processed by A just before the pause
    a.begin(partial)
    a_state.add(partial)
    a.processed(commits(partial))

    b_consumer, b_state = ScriptedConsumer(0), Seen()
    b = ForecastCheckpoint(settings, b_consumer, lambda: b_state)
    b.assigned([tp(0)])
    assert b_consumer.seeks == [(0, 5)] and b_state.seen == {0: 5}
    more = batch(p0=range(5, 12))
    b.begin(more)
    b_state.add(more)
    b.processed(commits(more))
    b.flush(wait=True)

    a.flush(wait=True)  # A thaws
    assert a_consumer.commits == [{0: 5, 1: 2}, {1: 3}]  # partition 0's offset 7 is not committed
    assert 0 not in a_state.seen and a_state.seen == {1: 3}
    assert saved(settings, b, 0) == {"offset": 12, "seen": 12}


def test_a_rebalance_during_a_batchs_polls_drops_what_it_moved(settings: Settings) -> None:
    consumer, state = ScriptedConsumer(0, 1, 2), Seen()
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    gathered = batch(p0=range(0, 3), p1=range(10, 12), p2=range(20, 21))
    checkpoint.gather(gathered)
    checkpoint.revoked([tp(1), tp(2)])  # inside a poll of complete_batch
    checkpoint.assigned([tp(2)])  # partition 2 comes back: read again from its save
    gathered.setdefault(tp(2), []).extend([Record(20), Record(21)])  # polled after the rebalance
    checkpoint.gather(None)
    assert {t.partition: [r.offset for r in rs] for t, rs in gathered.items()} == {0: [0, 1, 2], 2: [20, 21]}
    assert consumer.seeks == [(2, 20)]  # kept by this process: read again from the first record dropped
    checkpoint.revoked([tp(0)])  # after the batch was gathered: the batch is left alone
    assert tp(0) in gathered


def test_a_state_saved_for_an_earlier_topic_is_not_resumed(settings: Settings, monkeypatch) -> None:
    import models.serving.checkpoint as module

    consumer, state = ScriptedConsumer(0), Seen()
    monkeypatch.setattr(module, "topic_id", lambda consumer, topic: "topic-1")
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    checkpoint.assigned([tp(0)])
    b = batch(p0=range(0, 4))
    checkpoint.begin(b)
    state.add(b)
    checkpoint.processed(commits(b))
    checkpoint.flush(wait=True)

    monkeypatch.setattr(module, "topic_id", lambda consumer, topic: "topic-2")  # deleted and created again
    again, again_state = ScriptedConsumer(0), Seen()
    again_state.seen[0] = 4
    ForecastCheckpoint(settings, again, lambda: again_state).assigned([tp(0)])
    assert again.seeks == [(0, 0)] and again_state.seen == {}


class HeldSeen(Seen):
    """A :class:`Seen` whose saves are encoded only once ``release`` is set (a slow write, in the writer thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def snapshot(self, partition: int, offset: int) -> Callable[[], bytes]:
        encode = super().snapshot(partition, offset)

        def held() -> bytes:
            assert self.release.wait(10)
            return encode()

        return held


def test_a_save_is_written_off_the_loop_and_committed_once_written(settings: Settings) -> None:
    consumer, state = ScriptedConsumer(0), HeldSeen()
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    consumer.on_commit = lambda offsets: seen_at_commit.append(saved(settings, checkpoint, 0))
    seen_at_commit: list[dict | None] = []
    first = batch(p0=range(0, 5))
    checkpoint.begin(first)
    state.add(first)
    checkpoint.processed(commits(first))
    checkpoint.flush()  # returns while the state is still being written
    second = batch(p0=range(5, 7))
    checkpoint.begin(second)
    state.add(second)  # the loop goes on: the save in progress is of the state at the flush
    checkpoint.processed(commits(second))
    assert consumer.commits == [] and saved(settings, checkpoint, 0) is None
    state.release.set()
    checkpoint._saving.done.result(10)
    checkpoint.processed({})  # the first call after the write commits what it covers, and only that
    assert consumer.commits == [{0: 5}] and seen_at_commit == [{"offset": 5, "seen": 5}]
    checkpoint.flush(wait=True)
    assert consumer.commits == [{0: 5}, {0: 7}] and saved(settings, checkpoint, 0) == {"offset": 7, "seen": 7}


def test_a_rewind_during_a_save_goes_back_to_it_and_a_failed_save_to_the_one_before(settings: Settings) -> None:
    consumer, state = ScriptedConsumer(0, 1), HeldSeen()
    state.release.set()
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: state)
    first = batch(p0=range(0, 5))
    checkpoint.begin(first)
    state.add(first)
    checkpoint.processed(commits(first))
    checkpoint.flush(wait=True)

    # partition 1's log is blocked by a file (a real OSError in the writer): the next save fails there
    blocked = Path(settings.history_location) / "_state" / f"{checkpoint.name(1)}.log"
    blocked.write_bytes(b"")
    second = batch(p0=range(5, 8), p1=range(20, 22))
    checkpoint.begin(second)
    state.add(second)
    checkpoint.processed(commits(second))
    checkpoint.flush()
    checkpoint._saving.done.exception(10)
    with pytest.raises(StoreUnavailable):
        checkpoint.processed({})  # the failed save is raised on the loop; nothing of it is committed
    assert consumer.commits == [{0: 5}]
    blocked.unlink()  # the outage is over
    checkpoint.rewind({})  # what the loop does on the error
    # partition 0's save went through before partition 1's failed: it resumes from it; partition 1 was never
    # saved: from the first offset processed since the last save
    assert sorted(consumer.seeks) == [(0, 8), (1, 20)]
    assert state.seen == {0: 8}
