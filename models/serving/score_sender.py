"""Scores off the forecasts' critical path: a batch's score messages are built and sent by a thread of their
own, through a producer of their own, after the batch's forecasts are acknowledged.

The forecast loop (:func:`models.serving.session.process_batch`) hands each batch's scored forecasts
(:class:`~models.scoring.scorer.Emitted`, arrays copied out of the scorer's state) to :meth:`ScoreSender.submit`
and goes back to polling: the next batch's forecasts wait neither for the score messages' JSON nor for the
broker's acknowledgement of them (one producer, confirmed with ``flush``, would wait for both). The
checkpoint (:mod:`models.serving.checkpoint`) calls :meth:`ScoreSender.confirm` before it saves the scoring
state, so no state is saved, and no offset committed, that covers a score the broker has not acknowledged:
the exactly-once argument of :mod:`models.scoring.scorer` is unchanged. A score that fails is raised by the
next :meth:`confirm` (or :meth:`submit`), and the loop rewinds to the last save as for a failed forecast.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from models.serving.telemetry import ANOMALIES, LIVE, SCORES, STAGE_S
from pipeline.config import Settings

if TYPE_CHECKING:
    from models.scoring.accuracy import LiveAccuracy
    from models.scoring.scorer import Emitted
    from pipeline.kafka.producer import BulkProducer
    from pipeline.windows_io import KeyPartitions

log = logging.getLogger("rollcast.forecast")


class ScoreSender:
    """One session's score producer and the thread that builds and sends score messages (module docstring).

    ``live`` gets every batch's sums (the live-accuracy gauges); the thread is its only user."""

    def __init__(self, settings: Settings, producer: BulkProducer, live: LiveAccuracy | None = None):
        self.settings = settings
        self.topic = settings.topics.scores
        self.producer = producer
        self.live = live
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollcast-scores")
        self._lock = threading.Lock()  # confirm() may run in kafka-python's thread (a rebalance callback)
        self._pending: list[Future[None]] = []
        self._failed: BaseException | None = None  # once a score failed, every later call raises it

    def submit(self, scored: Emitted, partitions: KeyPartitions, anomaly_partitions: KeyPartitions | None = None) -> None:
        """Build and send ``scored``'s messages in the background (``partitions``: the scores topic's;
        ``anomaly_partitions``: the anomalies topic's, needed when ``scored`` flagged any)."""
        with self._lock:
            self._raise_failed()
            self._pending.append(self._pool.submit(self._send, scored, partitions, anomaly_partitions))

    def confirm(self) -> None:
        """Return when every score submitted so far is built, sent and acknowledged by the broker; raise
        (:class:`~pipeline.errors.BrokerUnavailable`, or what building one raised) otherwise."""
        with self._lock:
            self._raise_failed()
            pending, self._pending = self._pending, []
            try:
                for f in pending:
                    f.result()
                # one flush of the producer acknowledges both topics' messages
                self.producer.confirm(f"{self.topic} or {self.settings.topics.anomalies}",
                                      timeout_s=self.settings.observability.shutdown_timeout_s)
            except BaseException as e:
                self._failed = e  # the state in memory covers scores the broker may not have: never saved now
                raise

    def close(self, timeout_s: float) -> None:
        """Finish what was submitted (up to ``timeout_s`` for the broker), then stop the thread."""
        self._pool.shutdown(wait=True)
        self.producer.close(timeout_s)

    def _raise_failed(self) -> None:
        """Raise the error of a score that failed: at a confirm before, or in a send that has finished."""
        for f in [f for f in self._pending if f.done()]:
            self._pending.remove(f)
            if f.exception() is not None and self._failed is None:
                self._failed = f.exception()
        if self._failed is not None:
            raise self._failed

    def _send(self, scored: Emitted, partitions: KeyPartitions, anomaly_partitions: KeyPartitions | None) -> None:
        t0 = time.perf_counter()
        messages = scored.messages()
        self.producer.send(self.topic, [(key.encode(), value, partitions[key]) for key, value in messages])
        SCORES.inc(len(messages))
        flagged = scored.anomaly_messages()
        if flagged:
            if anomaly_partitions is None:
                raise ValueError("anomalies flagged without the anomalies topic's partitions (a bug)")
            self.producer.send(self.settings.topics.anomalies,
                               [(key.encode(), value, anomaly_partitions[key]) for key, value in flagged])
            ANOMALIES.inc(len(flagged))
        if self.live is not None:
            report_live(self.live, scored.totals(), self.settings.window.length_ms)
        STAGE_S.labels("scores").observe(time.perf_counter() - t0)


def report_live(live: LiveAccuracy, totals: list[Any], step_ms: int) -> None:
    """Add a batch's scores to the sliding sums; set the gauges of the versions they concern."""
    versions = set()
    for version, origin, sums in totals:
        live.add(version, origin, step_ms, sums)
        versions.add(version)
    for version in versions:
        figures = live.totals(version).as_dict()
        for name, gauge in LIVE.items():
            gauge.labels(version).set(figures[name])
