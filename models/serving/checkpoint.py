"""When the forecast job commits: after the scoring and calibration state of what it processed is durable.

With live scoring on, a forecast depends on more than its window's context: on the calibration learned
from every earlier window of its series, and its score on forecasts issued up to H windows before.
That state is saved per windows partition in the history store (:meth:`HistoryStore.write_state`,
atomic), each record naming the offset it covers, every ``scoring.checkpoint_s``; only then are those
offsets committed. On assignment each partition's state is loaded and the consumer seeks to its offset,
so a restart after a crash, or a partition that moved to another process, resumes from exactly the state
that covers what it re-reads: the forecasts and scores it publishes again repeat the same values, and
none is missing. The saved record, not the group's commit, decides where a partition resumes: a commit
lost in a crash or a rebalance only means that the commit lags.

The state is kept in the history store because every forecast process already reads it (a local
directory or an object store: rollcast's one durable place outside Kafka and MLflow).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from pipeline.config import Settings
from pipeline.store import HistoryStore

log = logging.getLogger("rollcast.forecast")


class PartitionState(Protocol):
    """What is saved per partition (:class:`models.scoring.scorer.Scorer`)."""

    def save(self, partition: int, offset: int) -> bytes: ...

    def load(self, partition: int, data: bytes) -> int | None: ...

    def drop(self, partition: int) -> None: ...


class ScoringCheckpoint:
    """Offsets processed but not yet committed, the state saves that must come first, and the seeks to the
    saved offsets on assignment."""

    def __init__(self, settings: Settings, consumer: Any, state: Callable[[], PartitionState | None]):
        self.settings = settings
        self.consumer = consumer
        self._state = state  # the current one: a model swap may replace it
        self.store = HistoryStore(settings)
        self.every_s = settings.scoring.checkpoint_s
        self.timeout_ms = int(settings.observability.shutdown_timeout_s * 1000)
        self.pending: dict[Any, Any] = {}  # TopicPartition -> OffsetAndMetadata, processed since the last save
        self.started: dict[Any, int] = {}  # TopicPartition -> first offset processed since the last save
        self._last = time.monotonic()

    @property
    def state(self) -> PartitionState | None:
        return self._state()

    def name(self, partition: int) -> str:
        return f"forecast/{self.settings.groups.forecast}/{self.settings.topics.windows}-{partition}.npz"

    def begin(self, batch: dict[Any, list[Any]]) -> None:
        """A batch is about to be processed (the scorer's state will move past it)."""
        for tp, records in batch.items():
            if records:
                self.started.setdefault(tp, records[0].offset)

    def rewind(self, batch: dict[Any, list[Any]]) -> None:
        """A batch failed (its forecasts or scores were not all acknowledged): every partition processed
        since the last save goes back to that save, state and position, and is read again."""
        self.begin(batch)
        assigned = self.consumer.assignment()
        started, self.started = self.started, {}
        for tp in self.pending:
            started.setdefault(tp, self.pending[tp].offset)
        self.pending = {}
        state = self.state
        for tp, first in started.items():
            if tp not in assigned:
                continue
            offset = None
            if state is not None:
                data = self.store.read_state(self.name(tp.partition))
                if data is None:
                    state.drop(tp.partition)  # built from nothing since `first`: rebuilt the same way
                else:
                    offset = state.load(tp.partition, data)
            self.consumer.seek(tp, first if offset is None else offset)

    def processed(self, commits: dict[Any, Any]) -> None:
        """Record the offsets after a batch whose forecasts and scores the broker acknowledged; save and
        commit when due (every batch without scoring)."""
        self.pending.update(commits)
        if self.state is None or time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Save the state of every partition processed since the last save, then commit its offsets."""
        self._last = time.monotonic()
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        self.started = {}
        self._save(pending)
        # bounded: kafka-python retries a commit forever while the coordinator is unknown
        self.consumer.commit(pending, timeout_ms=self.timeout_ms)

    def _save(self, offsets: dict[Any, Any]) -> None:
        if self.state is None:
            return
        for tp, om in offsets.items():
            self.store.write_state(self.name(tp.partition), self.state.save(tp.partition, om.offset))

    def revoked(self, partitions: Iterable[Any]) -> None:
        """Before partitions go: save what was processed of them (the next owner resumes from it) and forget
        their series. The commit is left to the next owner's resume (kafka-python cannot block in here)."""
        revoked = set(partitions)
        mine = {tp: om for tp, om in self.pending.items() if tp in revoked}
        for tp in mine:
            del self.pending[tp]
        for tp in revoked:
            self.started.pop(tp, None)
        try:
            self._save(mine)
        except Exception as e:  # noqa: BLE001 - the new owner then resumes from the previous save
            log.warning("could not save the scoring state of revoked partitions %s: %s",
                        sorted(tp.partition for tp in mine), e)
        if self.state is not None:
            for tp in revoked:
                self.state.drop(tp.partition)

    def assigned(self, partitions: Iterable[Any]) -> None:
        """Load each assigned partition's saved state and seek to the offset it covers (moved or kept: the
        position the client library left is not relied on)."""
        if self.state is None:
            return
        for tp in partitions:
            data = self.store.read_state(self.name(tp.partition))
            if data is None:
                self.state.drop(tp.partition)
                continue
            offset = self.state.load(tp.partition, data)
            if offset is not None:
                self.consumer.seek(tp, offset)
                log.info("windows partition %d resumes at offset %d with its saved scoring state",
                         tp.partition, offset)
