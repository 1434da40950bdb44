"""When the forecast job commits: after the forecasts and scores of what it processed are acknowledged
and the scoring and calibration state that covers them is durable.

Every batch of windows goes through these steps, in this order (:func:`models.serving.session.process_batch`
runs steps 2 and 3, :func:`models.serving.session.forecast_session` step 1 and the rewind of step 2):

1. :meth:`ForecastCheckpoint.begin`: before the batch is processed, note each partition's first offset
   in it, unless one is noted already since the last save: where a rewind (step 2) reads it again from.
2. Forecast and score the batch, send the forecasts, and wait until the broker acknowledged every one
   (:meth:`~pipeline.kafka.producer.BulkProducer.confirm`). The scores follow in the background
   (:class:`~models.serving.score_sender.ScoreSender`); step 4 first waits until the broker acknowledged
   every score sent so far (:attr:`ForecastCheckpoint.acknowledge`). If it did not, nothing below runs, and
   :meth:`ForecastCheckpoint.rewind` takes every partition processed since the last save back to that
   save, state and position (the saved state is loaded, or dropped where there is none, and the
   consumer seeks to the offset the save covers, else to the offset noted in step 1); the session
   ends, and the next one reads those windows again. A broker or store error in steps 3-5 of the
   batch rewinds the same way.
3. :meth:`ForecastCheckpoint.processed`: record each partition's next offset as pending. Steps 4 and 5
   (:meth:`ForecastCheckpoint.flush`) run when a save is due: after every batch without scoring; with
   scoring every ``scoring.checkpoint_s`` (idle or not), before a new champion is swapped in, and
   when a session ends.
4. Save the state of every pending partition to the history store
   (:meth:`~pipeline.store.HistoryStore.write_state`, atomic), each record naming the offset it
   covers. The state is copied as it is (:meth:`PartitionState.snapshot`) and encoded and written by a
   thread of its own, so the loop goes on with the next batch meanwhile (1,000 series' state is ~5 MB
   per partition, written durably: it stalled the loop for 0.15-0.3 s every ``checkpoint_s``). A save
   that fails raises on the loop: step 5 does not run, no offset is committed, and the offsets it
   covered are pending again.
5. Once the write is done (checked at every batch, and waited for by the session's last save):
   commit the offsets the save covers to the consumer group, waiting at most
   ``observability.shutdown_timeout_s`` (kafka-python retries a commit forever while the coordinator
   is unknown). A rebalance or a rewind waits for a save in progress first.

On a rebalance, the partitions revoked get step 4 only (:meth:`ForecastCheckpoint.revoked`: kafka-python
cannot block in the callback, and the next owner resumes from the save, not the commit), then their
state is dropped; each partition assigned has its saved state claimed and loaded, and the consumer seeks
to the offset it covers (:meth:`ForecastCheckpoint.assigned`). A rebalance can run inside the polls that
gather one batch (:func:`pipeline.windows_io.complete_batch` polls more than once): the records gathered
before it of a partition it revoked or assigned are dropped from the batch (:meth:`ForecastCheckpoint.gather`),
since the partition is no longer this process's, or was taken back to its save and is read again from
there. So no batch processes, saves or commits a partition this process does not hold.

Step 4 is fenced (:mod:`pipeline.store`, "Fencing"): the assignment's claim makes every save of an earlier
owner fail. A process frozen past its session timeout that wakes up and saves is refused
(:class:`~pipeline.store.FencedWrite`): it does not commit those partitions' offsets, drops their state,
and rejoins the group. The new owner's state is never overwritten by a partial one. Each save also names
the incarnation of the windows topic (its topic ID): a state saved for an earlier incarnation is not
resumed from (``kafka.on_new_topic``).

Why: with live scoring on, a forecast depends on more than its window's context: on the calibration learned
from every earlier window of its series, and its score on forecasts issued up to H windows before.
That state is saved per windows partition in the history store, each record naming the offset it
covers, and only then are those offsets committed. On assignment each partition's state is loaded and
the consumer seeks to its offset, so a restart after a crash, or a partition that moved to another
process, resumes from exactly the state that covers what it re-reads: the forecasts and scores it
publishes again repeat the same values, and none is missing. The saved record, not the group's commit,
decides where a partition resumes: a commit lost in a crash or a rebalance only means that the commit
lags. Without scoring there is no state: step 4 saves nothing and every batch is committed.

The state is kept in the history store because every forecast process already reads it (a local
directory or an object store: rollcast's one durable place outside Kafka and MLflow).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.config import Settings
from pipeline.kafka.group import request_rejoin, topic_id
from pipeline.observability import TOPIC_INCARNATIONS
from pipeline.store import FencedWrite, HistoryStore, Lease

log = logging.getLogger("rollcast.forecast")


@dataclass
class _Save:
    """A save in progress: the offsets it covers, the first offsets processed before it, its write."""

    offsets: dict[Any, Any]
    started: dict[Any, int]
    done: Future[list[Any]]  # the partitions whose save was fenced


class PartitionState(Protocol):
    """What is saved per partition (:class:`models.scoring.scorer.Scorer`)."""

    def snapshot(self, partition: int, offset: int) -> Callable[[], bytes]:
        """The partition's state now, covering its windows before ``offset``: a function that encodes it."""
        ...

    def load(self, partition: int, data: bytes) -> int | None: ...

    def drop(self, partition: int) -> None: ...


class ForecastCheckpoint:
    """Offsets processed but not yet committed, the state saves that must come first, and the seeks to the
    saved offsets on assignment (the steps: see the module docstring)."""

    def __init__(self, settings: Settings, consumer: Any, state: Callable[[], PartitionState | None]):
        self.settings = settings
        self.consumer = consumer
        self._state = state  # the current one: a model swap may replace it
        self.store = HistoryStore(settings)
        self.every_s = settings.scoring.checkpoint_s
        self.timeout_ms = int(settings.observability.shutdown_timeout_s * 1000)
        self.pending: dict[Any, Any] = {}  # TopicPartition -> OffsetAndMetadata, processed since the last save
        self.started: dict[Any, int] = {}  # TopicPartition -> first offset processed since the last save
        self.leases: dict[Any, Lease] = {}  # TopicPartition -> the store's claim on its state
        self._gathering: dict[Any, list[Any]] | None = None  # the batch being polled (see gather)
        self._dropped: dict[Any, int] = {}  # TopicPartition -> first offset dropped from the batch polled
        self.failed: Exception | None = None  # raised by an assignment in a rebalance callback
        # returns once the broker acknowledged every score sent so far, raises if it did not: run before every
        # save (a saved state never covers a score that may be lost). Set by each session (its score producer)
        self.acknowledge: Callable[[], None] | None = None
        self._last = time.monotonic()
        # step 4 runs in a thread of its own, off the loop (a save of 1,000 series' state is ~5 MB per
        # partition, written durably); step 5 follows on the loop's thread, when the write is done
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="rollcast-state")
        self._saving: _Save | None = None

    @property
    def state(self) -> PartitionState | None:
        return self._state()

    def name(self, partition: int) -> str:
        return f"forecast/{self.settings.groups.forecast}/{self.settings.topics.windows}-{partition}.npz"

    def gather(self, batch: dict[Any, list[Any]] | None) -> None:
        """Polls for ``batch`` begin (``batch``) or end (None). A rebalance callback that runs meanwhile drops
        the records gathered so far of the partitions it revokes or assigns."""
        self._gathering = batch
        if batch is not None:
            self._dropped = {}

    def _drop_gathered(self, partitions: Iterable[Any]) -> None:
        if self._gathering is None:
            return
        for tp in partitions:
            dropped = self._gathering.pop(tp, None)
            if dropped:
                self._dropped.setdefault(tp, dropped[0].offset)
                log.info("windows partition %d moved while its batch was polled: %d records of it before the "
                         "rebalance are dropped", tp.partition, len(dropped))

    def raise_failed(self) -> None:
        """Raise the error an assignment met in a rebalance callback (kafka-python 3.0 re-raises it from
        ``poll()`` wrapped in a ``KafkaError``, other versions only log it): the partition's state could not
        be claimed or loaded (a store outage, or a saved state of an earlier incarnation of the topic with
        ``kafka.on_new_topic = "stop"``), so nothing may be processed."""
        if self.failed is not None:
            failed, self.failed = self.failed, None
            request_rejoin(self.consumer)  # the next session's assignment claims, loads and seeks again
            raise failed

    def begin(self, batch: dict[Any, list[Any]]) -> None:
        """Step 1: a batch is about to be processed (the scorer's state will move past it)."""
        # 1. note where each partition of the batch is read again from, if it has to be
        for tp, records in batch.items():
            if records:
                self.started.setdefault(tp, records[0].offset)

    def rewind(self, batch: dict[Any, list[Any]]) -> None:
        """A batch failed (its forecasts or scores were not all acknowledged): every partition processed
        since the last save goes back to that save, state and position, and is read again (step 2)."""
        # 2. not all acknowledged: steps 3-5 do not run; back to the last save, state and position
        self._finish_save(commit=False)  # the save in progress, if any, is the last save (or fails: pending)
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
        # 3. acknowledged: pending until the next save
        self.pending.update(commits)
        if self._saving is not None and self._saving.done.done():
            self._finish_save()  # 5. of the last save, written meanwhile
        if self.state is None or time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Steps 4 and 5: save the state of every partition processed since the last save, then commit its
        offsets. With scoring the save is written in the background and committed by the next call of
        :meth:`processed` or :meth:`flush` after it is written, or here with ``wait``. Raises what the save
        in progress or this one's acknowledgement met."""
        self._last = time.monotonic()
        self._finish_save()
        if not self.pending:
            return
        if self.state is None:  # nothing to save: 5. commit; bounded (kafka-python retries forever while the
            pending, self.pending = self.pending, {}  # coordinator is unknown)
            self.started = {}
            self.consumer.commit(pending, timeout_ms=self.timeout_ms)
            return
        # 4. every score sent is acknowledged (raises: nothing is saved or committed, the caller rewinds)
        if self.acknowledge is not None:
            self.acknowledge()
        pending, self.pending = self.pending, {}
        started, self.started = self.started, {}
        # then each partition's state is taken as it is now, and written, naming the offset it covers
        self._saving = self._save_in_background(pending, started)
        if wait:
            self._finish_save()

    def _save_in_background(self, offsets: dict[Any, Any], started: dict[Any, int]) -> _Save:
        state = self.state
        assert state is not None
        states = {tp: state.snapshot(tp.partition, om.offset) for tp, om in offsets.items()}
        leases = {tp: self.leases.get(tp) for tp in offsets}

        def write() -> list[Any]:
            fenced = []
            for tp, encode in states.items():
                try:
                    self.store.write_state(self.name(tp.partition), encode(), lease=leases[tp])
                except FencedWrite as e:
                    log.warning("windows partition %d was fenced: %s; its scoring state is dropped, not saved or "
                                "committed, and the group rejoined", tp.partition, e)
                    fenced.append(tp)
            return fenced

        return _Save(offsets, started, self._writer.submit(write))

    def _finish_save(self, commit: bool = True) -> None:
        """Wait for the save in progress, then 5. commit the offsets it covers (``commit`` False, inside a
        rebalance callback or a rewind: they are pending again, for the next save to commit). A save that
        failed leaves its offsets pending and its first offsets noted (a rewind goes back before them), and
        raises when ``commit``; a fenced partition's state is dropped and the group rejoined."""
        saving, self._saving = self._saving, None
        if saving is None:
            return
        try:
            fenced = saving.done.result()
        except Exception:
            self.pending = {**saving.offsets, **self.pending}
            self.started = {**self.started, **saving.started}  # the older first offset wins
            if commit:
                raise
            log.warning("saving the scoring state failed; its offsets stay pending", exc_info=True)
            return
        offsets = {tp: om for tp, om in saving.offsets.items() if tp not in fenced}
        for tp in fenced:
            if self.state is not None:
                self.state.drop(tp.partition)
            self.leases.pop(tp, None)
            self.pending.pop(tp, None)
            self.started.pop(tp, None)
        if offsets and commit:
            self.consumer.commit(offsets, timeout_ms=self.timeout_ms)
        elif offsets:
            self.pending = {**offsets, **self.pending}
        if fenced:
            request_rejoin(self.consumer)

    def _save(self, offsets: dict[Any, Any]) -> None:
        """Save the state of each partition in ``offsets`` now, on this thread (a revoked partition's)."""
        if self.state is None or not offsets:
            return
        self._saving = self._save_in_background(offsets, {})
        self._finish_save(commit=False)
        for tp in offsets:  # saved: its next owner resumes from the save, and commits
            self.pending.pop(tp, None)

    def revoked(self, partitions: Iterable[Any]) -> None:
        """Before partitions go: save what was processed of them (the next owner resumes from it) and forget
        their series. The commit is left to the next owner's resume (kafka-python cannot block in here)."""
        revoked = set(partitions)
        self._drop_gathered(revoked)
        self._finish_save(commit=False)
        mine = {tp: om for tp, om in self.pending.items() if tp in revoked}
        for tp in mine:
            del self.pending[tp]
        for tp in revoked:
            self.started.pop(tp, None)
        try:
            # 4. for the revoked partitions, without step 5
            if mine and self.acknowledge is not None:
                self.acknowledge()
            self._save(mine)
        except Exception as e:  # noqa: BLE001 - the new owner then resumes from the previous save
            log.warning("could not save the scoring state of revoked partitions %s: %s",
                        sorted(tp.partition for tp in mine), e)
        for tp in revoked:
            self.leases.pop(tp, None)
            if self.state is not None:
                self.state.drop(tp.partition)

    def assigned(self, partitions: Iterable[Any]) -> None:
        """Claim each assigned partition's saved state, load it and seek to the offset it covers (moved or
        kept: the position the client library left is not relied on)."""
        partitions = list(partitions)
        self._drop_gathered(partitions)
        self._finish_save(commit=False)
        for tp in partitions:
            if tp in self._dropped:  # kept through the rebalance: the client's position is past what was dropped
                self.consumer.seek(tp, self._dropped.pop(tp))
        if self.state is None:
            return
        incarnation = topic_id(self.consumer, self.settings.topics.windows)
        for tp in partitions:
            claim = self.store.claim_state(self.name(tp.partition), incarnation, self.settings.kafka.on_new_topic)
            self.leases[tp] = claim.lease
            if claim.new_topic:
                TOPIC_INCARNATIONS.labels(tp.topic).inc()
                log.warning("windows partition %d: its saved scoring state counts offsets of topic ID %s, %s is "
                            "now topic ID %s: starting it afresh from the partition's beginning "
                            "(kafka.on_new_topic = restart)", tp.partition, claim.previous_topic_id, tp.topic,
                            incarnation)
                self.consumer.seek_to_beginning(tp)
            data = claim.data
            if data is None:
                self.state.drop(tp.partition)
                continue
            offset = self.state.load(tp.partition, data)
            if offset is not None:
                self.consumer.seek(tp, offset)
                log.info("windows partition %d resumes at offset %d with its saved scoring state",
                         tp.partition, offset)
