"""The ingest engine: decode a poll batch, reject bad input, window, checkpoint.

Used by ``rollcast ingest`` (:mod:`jobs.ingest`) and the benchmarks. One
:class:`Ingestor` serves all partitions a consumer is assigned; its
:meth:`Ingestor.listener` keeps state consistent across rebalances: on revoke
it checkpoints and drops the revoked partitions' state, on assign it rebuilds
it from the history store (progress record and last window per series) and
re-reads from the committed offset.

:meth:`Ingestor.submit` processes one poll in a single worker thread while the
caller goes back to ``consumer.poll()``: kafka-python decodes the next fetch
(pure Python, holding the GIL) while polars and pyarrow, which release it,
decode and window the previous one. All consumer calls stay in the caller's
thread; every method that reads or changes partition state (assign, revoke,
close_idle, checkpoint, process) first waits for the submitted work with
:meth:`Ingestor.drain`, so state is only ever touched by one thread at a time
and a checkpoint never covers half-processed records. An error in the worker
is raised by the next ``drain()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import polars as pl
from kafka import ConsumerRebalanceListener

from pipeline import metrics
from pipeline.checkpoint import Checkpoint, PartitionRun
from pipeline.config import Settings
from pipeline.decode import LATE, ROW_BITS, Decoder, Rejected, _ipc_bytes, is_arrow
from pipeline.dlq import DeadLetters
from pipeline.store import HistoryStore
from pipeline.windows import TumblingWindow, WindowState
from pipeline.windows_io import WindowRouter

log = logging.getLogger(__name__)


class Ingestor:
    """Everything between ``consumer.poll()`` and ``consumer.commit()``."""

    def __init__(self, settings: Settings, consumer: Any, producer: Any, store: HistoryStore | None = None,
                 windows_partitions: int | None = None, checkpoint_interval_s: float = 1.0):
        self.settings = settings
        self.consumer = consumer
        self.topic = settings.topics.observations
        self.spec = TumblingWindow.from_settings(settings.window)
        self.decoder = Decoder(settings.fields, settings.window.min_ts_ms, settings.window.max_ts_ms)
        self.store = store or HistoryStore(settings)
        self.dlq = DeadLetters(producer, settings.topics.dlq)
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
        self._pending: Future[None] | None = None
        self.failed: Exception | None = None  # set by a rebalance callback that raised

    # -- partitions -------------------------------------------------------------------------

    def assign(self, partitions: Iterable[int]) -> None:
        """Rebuild state for newly assigned partitions from the history store."""
        self.drain()
        self._assign(partitions)

    def _assign(self, partitions: Iterable[int]) -> None:
        self.rebalancing = False
        self.last_assigned = time.monotonic()
        new = [p for p in partitions if p not in self.runs]
        if not new:
            return
        # Recover first: it may move a committed checkpoint's windows into the store, and replay must
        # see them as closed, or it would close (and store) them a second time.
        recovered = {p: self.store.recover(self.topic, p) for p in new}
        closed_until = self.store.max_window_end()
        for p in new:
            progress = recovered[p]
            state = WindowState(self.spec, closed_until=dict(closed_until))
            run = PartitionRun(state)
            if progress is not None:
                state.max_ts = progress.max_ts
                run.replay_until = progress.position
            self.runs[p] = run
            log.info("assigned partition %d (resume after offset %d)", p, run.replay_until)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Checkpoint the revoked partitions, then forget them."""
        self.drain()
        self.rebalancing = True
        gone = {p: self.runs[p] for p in partitions if p in self.runs}
        if gone:
            self.checkpointer.commit(gone, blocking=False)
        for p in gone:
            del self.runs[p]
            log.info("revoked partition %d", p)

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to pass to ``consumer.subscribe``."""
        ingestor = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                ingestor._rebalance_step(ingestor.revoke, revoked)

            def on_partitions_assigned(self, assigned: Any) -> None:
                ingestor._rebalance_step(ingestor.assign, assigned)

        return _Listener()

    def _rebalance_step(self, step: Any, tps: Any) -> None:
        """Run ``revoke`` or ``assign`` for a rebalance callback. kafka-python logs and swallows a
        callback's exception, so it is also kept for raise_failed()."""
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
        """Process one ``consumer.poll()`` result (TopicPartition -> records) in the worker thread."""
        self.drain()
        items = [(tp.partition, records) for tp, records in batch.items() if records]
        if items:
            self._pending = self._worker.submit(self._process_all, items, now)

    def drain(self) -> None:
        """Wait for the submitted poll to be processed; re-raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Stop the worker thread (after the last checkpoint)."""
        self._pending = None
        self._worker.shutdown(wait=True)

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
        now = time.monotonic() if now is None else now
        for run in self.runs.values():
            idle = run.state.idle_series(now, self.settings.window.idle_timeout_s)
            if idle:
                run.closed.append(run.state.close_series(idle))

    def maybe_checkpoint(self, now: float | None = None) -> bool:
        """Every ``interval_s``: close idle series, then checkpoint.

        Idle series are closed here rather than after every poll (which would wait
        for the worker each time); their windows become visible only at a
        checkpoint anyway, so this delays nothing a reader can see.
        """
        now = time.monotonic() if now is None else now
        if now - self._last_checkpoint < self.interval_s:
            return False
        self.close_idle(now)
        self.checkpoint()
        return True

    def checkpoint(self) -> None:
        """Commit every assigned partition (see :class:`~pipeline.checkpoint.Checkpoint`)."""
        self.drain()
        self.checkpointer.commit(self.runs)
        self._last_checkpoint = time.monotonic()

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
