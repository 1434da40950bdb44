"""The checkpoint: offsets are committed only after what they cover is durable.

:meth:`Checkpoint.commit` runs these steps, in this order:

1. Produce every window closed since the last checkpoint to the ``windows``
   topic, one Arrow IPC message per target partition (murmur2 of the series).
2. ``producer.flush()``, then check every future of this checkpoint (windows
   and dead letters); if one failed, raise: nothing below runs, nothing is
   committed, and a restarted job redoes the work from the last commit.
3. For each source partition: write its closed windows to the history store
   together with its progress record (``position``, ``max_ts``, and the safe
   offset of step 4, ``safe``) —
   :meth:`~pipeline.store.HistoryStore.write_checkpoint` stages the files,
   atomically replaces the progress record (the commit point), then moves
   the files into the dataset.
4. Compute each partition's safe offset: its position, or the offset of the
   earliest event of a still-open window if that is lower, so that a restart
   re-reads every event an open window needs.
5. Commit those offsets to the consumer group: synchronously in the loop;
   asynchronously inside a rebalance callback (kafka-python cannot block on
   its IO thread there). Either is safe because step 3's progress record, not
   the Kafka commit, decides what a restart treats as already processed: a
   commit that is lost only means re-reading a little more. So a commit the
   group refuses while it rebalances is skipped, not an error.

Steps 1-4 are :meth:`Checkpoint.make_durable`, which the ingestor runs in its
worker thread (after the polls submitted before it, before those submitted
after); it returns the offsets, and step 5, :meth:`Checkpoint.commit_offsets`,
runs later in the consumer's thread. :meth:`Checkpoint.commit` runs all five
in the caller's thread.

Step 3 is fenced (:mod:`pipeline.store`, "Fencing"): each partition's write carries the lease its
assignment claimed, and a process that lost the partition to another meanwhile (frozen past its session
timeout, then thawed) is refused. Its staged windows are dropped, its state for the partition too, and
the partition is left out of step 5; the ingestor then ignores the partition's records and rejoins the
group (:meth:`pipeline.ingest.ingestor.Ingestor.assign` claims it again if the group gives it back).

A restart after a crash at any step: the store's progress record says which
offsets were already processed (their windows are in the store, their
rejects in the DLQ); re-read events below that position only rebuild the
windows that were open, so no window is written twice. A rebalance takes the
same path (:meth:`pipeline.ingest.ingestor.Ingestor.assign`): every partition the
ingestor is newly assigned, whether it moved or stayed, is rebuilt from its
progress record and read again from the record's ``safe`` offset. Windows produced in
step 1 of an unfinished checkpoint may be produced again with the same values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from kafka.errors import CommitFailedError, KafkaTimeoutError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata, TopicPartition

from pipeline.errors import RollcastError
from pipeline.ingest import telemetry as metrics
from pipeline.store import FencedWrite, HistoryStore, Lease, Progress
from pipeline.windows import WindowState
from pipeline.windows_io import WindowRouter

log = logging.getLogger(__name__)


class CheckpointError(RollcastError):
    """Producing to Kafka failed during a checkpoint; offsets were not committed."""


@dataclass
class PartitionRun:
    """Live state of one assigned source partition."""

    state: WindowState
    replay_until: int = -1  # offsets below this were processed before a restart
    position: int | None = None  # next offset to read; None until a record was seen
    closed: list[pl.DataFrame] = field(default_factory=list)  # closed since the last checkpoint
    lease: Lease | None = None  # the store's claim on the partition (None: the only writer, e.g. a tool)


class Checkpoint:
    """Makes closed windows and dead letters durable, then commits offsets (see module docstring)."""

    def __init__(self, consumer: Any, producer: Any, store: HistoryStore, topic: str, windows_topic: str,
                 router: WindowRouter, timeout_s: float = 60.0):
        self.consumer = consumer
        self.producer = producer
        self.store = store
        self.topic = topic
        self.windows_topic = windows_topic
        self.router = router
        self.timeout_s = timeout_s
        self.futures: list[Any] = []
        # a commit waits at most this long: never long enough to hold up a rebalance the loop must poll for
        self.commit_timeout_ms = 2000
        self.fenced: set[int] = set()  # partitions whose write the store refused, until the ingestor takes them

    def commit(self, runs: dict[int, PartitionRun], blocking: bool = True) -> None:
        """Run the five steps for ``runs`` (partition -> state); ``blocking=False`` in rebalance callbacks."""
        self.commit_offsets(self.make_durable(runs), blocking)

    def make_durable(self, runs: dict[int, PartitionRun]) -> dict[TopicPartition, OffsetAndMetadata]:
        """Steps 1-4: produce and store what ``runs`` closed; return the offsets now safe to commit.

        Touches no consumer, so it may run in another thread than the consumer's.
        """
        closed = {p: (pl.concat(r.closed) if r.closed else None) for p, r in runs.items()}
        # 1. produce closed windows
        everything = [df for df in closed.values() if df is not None and df.height]
        if everything:
            for part, value, headers in self.router.batch(pl.concat(everything)):
                self.futures.append(
                    self.producer.send(self.windows_topic, value=value, partition=part, headers=headers)
                )
        # 2. flush and check every future
        self.producer.flush(timeout=self.timeout_s)
        futures = list(self.futures)
        self.futures.clear()
        for fut in futures:
            if not fut.is_done or fut.failed():
                raise CheckpointError(
                    f"producing to Kafka failed during a checkpoint ({fut.exception}); "
                    "offsets were not committed, a restart redoes the work"
                )
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for p, run in list(runs.items()):
            if run.position is None:
                continue
            # 3. store write + progress record (the commit point), which keeps step 4's safe offset
            safe = run.state.commit_offset(run.position)
            windows = closed[p] if closed[p] is not None else pl.DataFrame(schema=run.state.spec.schema)
            try:
                self.store.write_checkpoint(self.topic, p, windows, Progress(run.position, run.state.max_ts, safe),
                                            lease=run.lease)
            except FencedWrite as e:
                # another process owns the partition now: what this one holds of it is dropped, not stored
                log.warning("partition %d was fenced: %s; its state is dropped and the group rejoined", p, e)
                self.fenced.add(p)
                del runs[p]
                continue
            run.closed.clear()
            for cause, n in _causes(windows):
                metrics.WINDOWS_CLOSED.labels(cause=cause).inc(n)
            # 4. safe offset
            offsets[TopicPartition(self.topic, p)] = OffsetAndMetadata(safe, "", -1)
        metrics.OPEN_WINDOWS.set(sum(r.state.n_open for r in runs.values()))
        return offsets

    def commit_offsets(self, offsets: dict[TopicPartition, OffsetAndMetadata], blocking: bool = True) -> None:
        """Step 5: commit offsets returned by :meth:`make_durable` (in the consumer's thread)."""
        if offsets and blocking:
            try:
                self.consumer.commit(offsets, timeout_ms=self.commit_timeout_ms)
            except (RebalanceInProgressError, CommitFailedError, KafkaTimeoutError) as e:
                # The group is rebalancing (always so while a cooperative rebalance runs: the consumer
                # keeps fetching), or moved on without this member, or the commit did not complete in time
                # (a broker may hold a commit while the group rebalances, and this thread must get back to
                # poll(), which the rebalance waits for). The progress record already holds what these
                # offsets cover; a later checkpoint, or the revoke's, commits again, and a commit skipped
                # means re-reading more.
                log.info("commit deferred (%s): the consumer group is rebalancing", type(e).__name__)
        elif offsets:
            self.consumer.commit_async(offsets)
        metrics.CHECKPOINTS.inc()


def _causes(windows: pl.DataFrame) -> list[tuple[str, int]]:
    if windows.height == 0:
        return []
    gaps = int((windows["count"] == 0).sum())
    return [("gap", gaps), ("closed", windows.height - gaps)]
