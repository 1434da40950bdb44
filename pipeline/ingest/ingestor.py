"""The ingest engine: decode a poll batch, reject bad input, window, checkpoint.

Used by ``rollcast ingest`` (:mod:`jobs.ingest`) and the benchmarks. One
:class:`Ingestor` serves all partitions a consumer is assigned; its
:meth:`Ingestor.listener` keeps state consistent across rebalances: on revoke
it checkpoints and drops the revoked partitions' state; on assign it rebuilds
the state of every partition it does not hold from the history store
(progress record and last window per series), as a restart does, and seeks
the partition to the safe offset its progress record keeps (the offset that
checkpoint committed), so the events of its open windows are read again. The
seek is what makes this independent of the client library: kafka-python, like
the Java client, keeps the fetch position of a partition that stays assigned
through an eager rebalance, and without the seek the consumer would carry on
after the last record it read and never rebuild those windows. Under a
cooperative protocol a partition that stays is neither revoked nor assigned,
and keeps its state. A partition lost without a clean revoke (the group
evicted this consumer) is dropped without a checkpoint: another consumer may
own it already. Every assignment claims the partition's progress record in
the store (:meth:`pipeline.store.HistoryStore.claim`), which fences the
writes of any earlier owner still running: a process that was frozen past its
session timeout and wakes up is refused at its next checkpoint, drops the
partition's state, ignores its records and rejoins the group.

:meth:`Ingestor.submit` hands one poll to a single worker thread and returns
at once, so the caller goes straight back to ``consumer.poll()``: kafka-python
decodes the next fetch (pure Python, holding the GIL) while polars and
pyarrow, which release it, decode and window the previous ones. A due
checkpoint is handed to the same worker (:meth:`Ingestor.maybe_checkpoint`),
which runs its produce, flush and store write (steps 1-4 of
:class:`~pipeline.ingest.checkpoint.Checkpoint`) in order with the polls, and the
offsets it made safe are committed by the caller's thread at its next call
(:meth:`Ingestor.submit` or :meth:`Ingestor.maybe_checkpoint`): the worker
never calls the consumer, and no offset is committed before what it covers is
durable. At most ``max_inflight`` tasks wait for the worker (memory
stays bounded; the caller waits when the worker falls behind). Every method
that reads or changes partition state in the caller's thread (assign, revoke,
close_idle, checkpoint, process) first waits for all submitted work with
:meth:`Ingestor.drain`, so state is only ever touched by one thread at a time
and a checkpoint never covers half-processed records. An error in the worker
is raised in the caller's thread by the next call that collects its result;
the worker then refuses every later task and a revoke no longer checkpoints,
so the state the failed task left is dropped, never made durable.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import polars as pl
from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from pipeline.config import Settings
from pipeline.ingest import telemetry as metrics
from pipeline.ingest.checkpoint import Checkpoint, PartitionRun
from pipeline.ingest.decode import LATE, ROW_BITS, Decoder, Rejected, _ipc_bytes, is_arrow
from pipeline.ingest.dlq import DeadLetters
from pipeline.kafka.group import request_rejoin, topic_id
from pipeline.observability import TOPIC_INCARNATIONS
from pipeline.store import HistoryStore, Progress
from pipeline.windows import TumblingWindow, WindowState
from pipeline.windows_io import WindowRouter

log = logging.getLogger(__name__)

# The interpreter's GIL switch interval for a process running an Ingestor (``sys.setswitchinterval``;
# set by the entry point, e.g. ``rollcast ingest``). The worker gives up the GIL for every
# polars/pyarrow call and must win it back from the poll thread, which runs pure Python and lets
# go only when a waiter has waited a whole interval: at CPython's default 5 ms the worker spent
# most of its time waiting for the GIL (figures in BENCHMARKS.md) and the
# poll thread waited for the worker. At 0.5 ms a waiter gets the GIL within half a millisecond; the
# poll thread switches no more often (once per worker call either way).
GIL_SWITCH_INTERVAL_S = 0.0005


class Ingestor:
    """Everything between ``consumer.poll()`` and ``consumer.commit()``."""

    def __init__(self, settings: Settings, consumer: Any, producer: Any, store: HistoryStore | None = None,
                 windows_partitions: int | None = None, checkpoint_interval_s: float = 1.0, max_inflight: int = 2):
        self.settings = settings
        self.consumer = consumer
        self.topic = settings.topics.observations
        self.spec = TumblingWindow.from_settings(settings.window)
        self.decoder = Decoder(settings.fields, settings.window.min_ts_ms, settings.window.max_ts_ms)
        self.store = store or HistoryStore(settings)
        self.dlq = DeadLetters(producer, settings.topics.dlq, settings.kafka.dlq_max_message_bytes)
        if windows_partitions is None:
            found = producer.partitions_for(settings.topics.windows)
            windows_partitions = len(found) if found else settings.kafka.partitions
        self.checkpointer = Checkpoint(
            consumer, producer, self.store, self.topic, settings.topics.windows,
            WindowRouter(windows_partitions), timeout_s=settings.observability.shutdown_timeout_s,
        )
        self.checkpointer.futures = self.dlq.futures  # DLQ sends are checked at the checkpoint too
        self.runs: dict[int, PartitionRun] = {}
        self.interval_s = checkpoint_interval_s
        self._last_checkpoint = time.monotonic()
        self.accepted = 0  # observations placed in a window
        self.messages = 0  # Kafka messages processed
        self.rows = 0  # observations decoded or rejected (an Arrow message holds many)
        self.rebalancing = True  # until the first assignment, and between a revoke and the next assign
        self.last_assigned = time.monotonic()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-window")
        self.max_inflight = max_inflight
        # submitted to the worker, oldest first: polls (result None) and checkpoints (result: offsets to commit)
        self._inflight: deque[Future[Any]] = deque()
        self._checkpoint_running: Future[Any] | None = None
        self._worker_error: BaseException | None = None
        self.failed: Exception | None = None  # set by a rebalance callback that raised
        self._fresh_topic: set[int] = set()  # partitions of the last assignment read from their beginning
        self._rejoin_asked: set[int] = set()  # fenced partitions a rejoin was requested for
        self._incarnation: str | None = None  # the topic ID the partitions held were claimed in

    # -- partitions -------------------------------------------------------------------------

    def assign(self, partitions: Iterable[int]) -> None:
        """Rebuild state for newly assigned partitions from the history store, and seek each one to
        the safe offset of its last checkpoint (in a rebalance callback, in the consumer's thread).

        A partition without a progress record has no checkpoint: no record of it was ever processed
        (a revoke checkpoints every partition that was read), so the library's starting position
        (the committed offset, else ``auto_offset_reset``) is right; so it is for a record written
        before ``safe`` was kept, read only by a new consumer, which starts at the committed offset.
        A record of an earlier incarnation of the topic (``kafka.on_new_topic = "restart"``) is one of
        offsets that mean nothing now: the partition is read from its beginning.
        """
        self.drain(blocking=False)
        for p, progress in self._assign(partitions).items():
            tp = TopicPartition(self.topic, p)
            if p in self._fresh_topic:
                self.consumer.seek_to_beginning(tp)
            elif progress is not None and progress.safe is not None:
                self.consumer.seek(tp, progress.safe)
                log.info("partition %d: reading again from safe offset %d", p, progress.safe)

    def _assign(self, partitions: Iterable[int]) -> dict[int, Progress | None]:
        """Build the state of the partitions not held yet; return their progress records."""
        self.rebalancing = False
        self.last_assigned = time.monotonic()
        new = [p for p in partitions if p not in self.runs]
        self.checkpointer.fenced.difference_update(new)
        self._rejoin_asked.difference_update(new)
        self._fresh_topic = set()
        if not new:
            return {}
        # Claim first: it fences every earlier owner's writes, and it moves a committed checkpoint's
        # windows into the store, which replay must see as closed, or it would close (and store) them
        # a second time.
        incarnation = topic_id(self.consumer, self.topic)
        self._incarnation = incarnation
        claims = {p: self.store.claim(self.topic, p, incarnation, self.settings.kafka.on_new_topic) for p in new}
        for p, claim in claims.items():
            if claim.new_topic:
                TOPIC_INCARNATIONS.labels(self.topic).inc()
                self._fresh_topic.add(p)
                log.warning("partition %d: its progress record counts offsets of topic ID %s, %s is now topic ID "
                            "%s (deleted and created again, or a new broker): reading it from its beginning "
                            "(kafka.on_new_topic = restart)", p, claim.previous_topic_id, self.topic, incarnation)
        bound = self._recent_bound([c.progress for c in claims.values()])
        closed_until = self.store.max_window_end(bound, self.spec.duration_ms)
        lookup = None if bound is None else self.store.series_ends().get
        for p in new:
            progress = claims[p].progress
            state = WindowState(self.spec, closed_until=dict(closed_until), lookup=lookup)
            run = PartitionRun(state, lease=claims[p].lease)
            if progress is not None:
                state.max_ts = progress.max_ts
                run.replay_until = progress.position
            self.runs[p] = run
            log.info("assigned partition %d (resume after offset %d)", p, run.replay_until)
        return {p: c.progress for p, c in claims.items()}

    def _recent_bound(self, progress: list[Progress | None]) -> int | None:
        """The window end from which a rebuilt partition's series are read from the store at assignment (the
        ``ends_from_ms`` of :meth:`~pipeline.store.HistoryStore.max_window_end`); None: all of them.

        A rebalance must not take a session timeout, and reading the last window of every series of a long
        history could (issue: 100,000 series x 5,000 windows). The watermark is restored from the record, so
        an event read again can only meet a stored window that ends after ``watermark - length``: the series
        stored since then are read now, from the newest files only (Parquet footers). Any other series is
        read the first time it is seen again (:attr:`~pipeline.windows.WindowState.lookup`,
        :class:`~pipeline.store.SeriesEnds`: newest days first, at most one read of the store per
        assignment), for the gap rows back to its last window: outside the rebalance callback, and only for
        series that come back after an idle spell or are new. A partition without a watermark (never
        checkpointed, or a new incarnation of the topic) may meet any stored window: then every series is
        read now."""
        if not progress or any(p is None or p.max_ts is None for p in progress):
            return None
        oldest = min(p.max_ts for p in progress if p is not None and p.max_ts is not None)
        return oldest - self.spec.grace_ms - self.spec.duration_ms

    def revoke(self, partitions: Iterable[int]) -> None:
        """Checkpoint the revoked partitions, then forget them."""
        self.rebalancing = True
        if self._worker_error is not None:  # e.g. consumer.close() after the loop stopped on that error
            log.warning("not checkpointing revoked partitions: the window worker failed (%s); "
                        "a restart redoes their work", self._worker_error)
            self.runs.clear()
            return
        self.drain(blocking=False)
        gone = {p: self.runs[p] for p in partitions if p in self.runs}
        held = list(gone)
        if gone:
            self.checkpointer.commit(gone, blocking=False)  # a fenced partition leaves `gone` unstored
        for p in held:
            del self.runs[p]
            log.info("revoked partition %d", p)

    def lose(self, partitions: Iterable[int]) -> None:
        """Forget partitions taken away without a clean revoke (kafka-python's ``on_partitions_lost``:
        the group evicted this consumer). Another consumer may own them and have moved on, so
        checkpointing their state could store a window twice; their next owner rebuilds them."""
        self.rebalancing = True
        if self._worker_error is None:
            self.drain(blocking=False)
        for p in partitions:
            if self.runs.pop(p, None) is not None:
                log.warning("lost partition %d without a revoke; its state is dropped, not checkpointed", p)

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to pass to ``consumer.subscribe``."""
        ingestor = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                ingestor._rebalance_step(ingestor.revoke, revoked)

            def on_partitions_assigned(self, assigned: Any) -> None:
                ingestor._rebalance_step(ingestor.assign, assigned)

            def on_partitions_lost(self, lost: Any) -> None:
                ingestor._rebalance_step(ingestor.lose, lost)

        return _Listener()

    def _rebalance_step(self, step: Any, tps: Any) -> None:
        """Run ``revoke`` or ``assign`` for a rebalance callback. The error is kept for raise_failed():
        kafka-python 3.0 re-raises it from ``poll()`` wrapped in a ``KafkaError`` (which
        :func:`pipeline.runtime.retry_sessions` unwraps), other versions only log it."""
        try:
            step(tp.partition for tp in tps)
        except Exception as e:
            self.failed = self.failed or e
            raise

    def raise_failed(self) -> None:
        """Raise the error of a rebalance callback (a checkpoint that failed there): the state it
        left is not known to be durable, so the caller must drop it and start over."""
        if self.failed is not None:
            raise self.failed

    # -- the loop body ----------------------------------------------------------------------

    def submit(self, batch: Mapping[Any, Sequence[Any]], now: float | None = None) -> None:
        """Hand one ``consumer.poll()`` result (TopicPartition -> records) to the worker thread."""
        self._collect()
        items = [(tp.partition, records) for tp, records in batch.items() if records]
        if items and self._topic_replaced():
            return  # read again from the beginning once the group has assigned the new topic's partitions
        if items:
            self._enqueue(self._process_all, items, now)

    def _topic_replaced(self) -> bool:
        """Whether the topic was deleted and created again under this running consumer (its topic ID in the
        client's metadata, refreshed every ``metadata_max_age_ms``, is not the one assigned). Then what is held
        counts offsets of the old topic: its closed windows are stored (under the old claim, no offsets
        committed), its open windows dropped (their records went with the old topic), and the group rejoined,
        so that each partition is claimed again as a new incarnation and read from its beginning
        (``kafka.on_new_topic``)."""
        current = topic_id(self.consumer, self.topic)
        if current is None or self._incarnation is None or current == self._incarnation:
            return False
        log.warning("%s was deleted and created again (topic ID %s, was %s): dropping the state of partitions "
                    "%s and rejoining the group", self.topic, current, self._incarnation, sorted(self.runs))
        self.drain()
        self.checkpointer.make_durable(self.runs)  # its record keeps the old topic ID
        self.runs.clear()
        self._incarnation = None
        request_rejoin(self.consumer)
        return True

    def drain(self, blocking: bool = True) -> None:
        """Wait for all submitted work, commit the offsets of its checkpoints (asynchronously when
        ``blocking`` is False: in a rebalance callback), and re-raise the first error; once a task
        failed, every later call raises (nothing may checkpoint the state it left)."""
        while self._inflight:
            self._finish_oldest(blocking)
        if self._worker_error is not None:
            raise RuntimeError("the window worker failed earlier; its state must be dropped") from self._worker_error

    def close(self) -> None:
        """Stop the worker thread (after the last checkpoint); work not started is dropped."""
        self._inflight.clear()
        self._checkpoint_running = None
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _enqueue(self, fn: Any, *args: Any) -> Future[Any]:
        while len(self._inflight) >= self.max_inflight:
            self._finish_oldest(True)
        future = self._worker.submit(self._run_task, fn, *args)
        self._inflight.append(future)
        return future

    def _run_task(self, fn: Any, *args: Any) -> Any:
        """In the worker: run one task, unless an earlier one failed (the state it left is not
        known to be consistent, so nothing after it may process or checkpoint)."""
        if self._worker_error is not None:
            raise RuntimeError("an earlier task of the ingest worker failed") from self._worker_error
        try:
            return fn(*args)
        except BaseException as e:
            self._worker_error = e
            raise

    def _collect(self) -> None:
        """Commit what finished checkpoints made durable, in order; raise a worker's error."""
        while self._inflight and self._inflight[0].done():
            self._finish_oldest(True)

    def _finish_oldest(self, blocking: bool) -> None:
        future = self._inflight[0]
        try:
            offsets = future.result()
        finally:
            self._inflight.popleft()
            if future is self._checkpoint_running:
                self._checkpoint_running = None
        if offsets is not None:
            self.checkpointer.commit_offsets(offsets, blocking)
        if blocking and self.checkpointer.fenced - self._rejoin_asked:
            # another process owns these partitions: the group has moved on without this one; rejoin now
            # rather than at the next failed heartbeat (their records are ignored until then)
            self._rejoin_asked |= self.checkpointer.fenced
            request_rejoin(self.consumer)

    def process(self, partition: int, records: Sequence[Any], now: float | None = None) -> None:
        """Decode, reject, window one partition's records (in offset order), in the caller's thread."""
        self.drain()
        self._process(partition, records, now)

    def _process_all(self, items: list[tuple[int, Sequence[Any]]], now: float | None) -> None:
        for partition, records in items:
            self._process(partition, records, now)

    def _process(self, partition: int, records: Sequence[Any], now: float | None) -> None:
        if not records:
            return
        run = self.runs.get(partition)
        if run is None:
            if partition in self.checkpointer.fenced:  # owned by another process now: not this one's to read
                return
            self._assign([partition])
            run = self.runs[partition]
        decoded = self.decoder.decode(records)
        replaying = records[0].offset < run.replay_until
        for item in decoded.rejected:
            if item.record.offset >= run.replay_until:
                self.dlq.send(item)
        added = run.state.add(decoded.events, now)
        late = added.late
        if replaying and late.height:
            late = late.filter(pl.col("offset") >= run.replay_until)
        if late.height:
            self._reject_late(records, late, run.state)
        if added.closed.height:
            run.closed.append(added.closed)
        run.position = records[-1].offset + 1
        n_ok = decoded.events.height - added.late.height
        self.accepted += n_ok
        self.messages += len(records)
        self.rows += decoded.events.height + sum(x.rows for x in decoded.rejected)
        fmt = "arrow" if decoded.arrow_messages else "json"
        metrics.MESSAGES.labels(format=fmt).inc(len(records))
        metrics.OBSERVATIONS.labels(format=fmt).inc(n_ok)
        if run.state.max_ts is not None:
            metrics.WATERMARK.labels(partition=str(partition)).set(run.state.watermark)

    def close_idle(self, now: float | None = None) -> None:
        """Close the windows of series idle for ``window.idle_timeout_s``."""
        self.drain()
        self._close_idle(time.monotonic() if now is None else now)

    def _close_idle(self, now: float) -> None:
        for run in self.runs.values():
            idle = run.state.idle_series(now, self.settings.window.idle_timeout_s)
            if idle:
                run.closed.append(run.state.close_series(idle))

    def maybe_checkpoint(self, now: float | None = None) -> bool:
        """Every ``interval_s``: hand the worker a checkpoint that first closes idle series.

        Returns whether one was started. Its offsets are committed by a later call of this method
        or :meth:`submit` (or by :meth:`drain`); a checkpoint still running delays the next one.
        Idle series are closed here rather than after every poll; their windows become visible
        only at a checkpoint anyway, so this delays nothing a reader can see.
        """
        self._collect()
        now = time.monotonic() if now is None else now
        if now - self._last_checkpoint < self.interval_s or self._checkpoint_running is not None:
            return False
        if self._topic_replaced():  # checked here too: no record may come (a position past the new topic's end)
            return False
        self._last_checkpoint = now
        self._checkpoint_running = self._enqueue(self._checkpoint_in_worker, now)
        return True

    def checkpoint(self) -> None:
        """Commit every assigned partition now (see :class:`~pipeline.ingest.checkpoint.Checkpoint`)."""
        self.drain()
        self.checkpointer.commit(self.runs)
        self._last_checkpoint = time.monotonic()

    def _checkpoint_in_worker(self, now: float) -> dict[Any, Any]:
        self._close_idle(now)
        return self.checkpointer.make_durable(self.runs)

    def _reject_late(self, records: Sequence[Any], late: pl.DataFrame, state: WindowState) -> None:
        by_offset = {r.offset: r for r in records}
        wm = state.watermark
        f = self.settings.fields
        for (offset,), rows in late.group_by("offset", maintain_order=True):
            record = by_offset[offset]
            detail = f"event time {rows['ts'][0]} falls in a window already closed (watermark {wm})"
            if is_arrow(record):
                sub = rows.select(
                    pl.col("series").alias(f.series), pl.col("ts").alias(f.ts), pl.col("value").alias(f.value),
                    (pl.col("seq") & ((1 << ROW_BITS) - 1)).alias("row"),
                )
                self.dlq.send(Rejected(record, LATE, detail, value=_ipc_bytes(sub.to_arrow()), rows=sub.height))
            else:
                self.dlq.send(Rejected(record, LATE, detail))
