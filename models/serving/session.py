"""One producer session of the forecast job: poll windows, forecast and score each batch, commit through
the checkpoint, and swap in a new champion between batches. ``rollcast forecast`` runs it (again after an
outage, see :func:`pipeline.runtime.retry_sessions`).

The consumer, the :class:`~models.serving.forecaster.Forecaster`, the scorer (:class:`LiveScoring`) and the
:class:`~models.serving.checkpoint.ForecastCheckpoint` outlive a session; each session has a producer of
its own. The checkpoint's module docstring lists the steps from a polled batch to its committed offsets.

The path of one score, from a windows batch to the scores topic: :func:`process_batch` hands the batch and
its inference to :meth:`models.scoring.scorer.Scorer.score_batch`, which settles earlier forecasts; once the
batch's forecasts are acknowledged, :func:`process_batch` hands what was scored to the
:class:`~models.serving.score_sender.ScoreSender`, which builds the score messages (:mod:`pipeline.scores_io`'s
format) and sends them in the background, off the next batch's path.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from models.scoring.accuracy import LiveAccuracy
from models.scoring.scorer import Emitted, Scorer
from models.serving.checkpoint import ForecastCheckpoint
from models.serving.score_sender import ScoreSender
from models.serving.telemetry import (
    BATCH_WAITS,
    END_TO_END_S,
    FORECASTS,
    LAG,
    MODEL_VERSION,
    SERIES,
    SKIPPED,
    STAGE_S,
    WINDOWS_IN,
)
from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable, StoreUnavailable
from pipeline.windows_io import complete_batch, decode_windows

if TYPE_CHECKING:
    import threading

    from models.serving.forecaster import Forecaster, LoadedModel
    from pipeline.kafka.producer import BulkProducer

log = logging.getLogger("rollcast.forecast")


def serving(model: LoadedModel, health: Any, **facts: Any) -> None:
    """From now on ``model`` is served: the version gauge, ``health``'s facts (``facts`` first; ``runtime``:
    "onnxruntime" or "eager", :attr:`~models.serving.forecaster.LoadedModel.runtime`) and the log line
    "serving version N (name, runtime)"."""
    MODEL_VERSION.set(float(model.version) if model.version.isdigit() else -1)
    health.facts.update(**facts, model=model.name, model_version=model.version, runtime=model.runtime)
    log.info("serving version %s (%s, %s)", model.version, model.name, model.runtime)


class LiveScoring:
    """The live scorer and online calibration (:class:`~models.scoring.scorer.Scorer`; None with scoring
    off) of the model served, across sessions and champions: the partition state the checkpoint saves
    (``ForecastCheckpoint(settings, consumer, lambda: scoring.scorer)``)."""

    def __init__(self, settings: Settings, model: LoadedModel):
        self.settings = settings
        self.scorer = Scorer(settings, model.ref, model.horizon, settings.window.length_ms, model.calibration) \
            if settings.scoring.enabled else None

    def swap(self, model: LoadedModel) -> None:
        """A new champion: the scorer serves it, or a new one does when it forecasts another horizon or
        other quantiles."""
        if self.scorer is None:
            return
        if self.scorer.compatible(model.ref, model.horizon):
            self.scorer.serve(model.ref, model.calibration)
        else:
            log.warning("version %s forecasts another horizon or other quantiles: forecasts of the previous "
                        "version still pending are not scored, and calibration starts afresh", model.version)
            self.scorer = Scorer(self.settings, model.ref, model.horizon, self.settings.window.length_ms,
                                 model.calibration)


def forecast_session(settings: Settings, forecaster: Forecaster, consumer: Any, checkpoint: ForecastCheckpoint,
                     shutdown: threading.Event, health: Any, *, scoring: LiveScoring, watcher: Any = None,
                     exit_when_idle_s: float | None = None) -> None:
    """One producer session: poll windows, forecast and score, commit, swap in a new champion.

    Runs until ``shutdown`` is set, or until no window arrived for ``exit_when_idle_s`` while partitions
    were assigned; then saves and commits what it processed. ``scoring`` holds the scorer the checkpoint
    saves. ``watcher`` (:class:`~models.serving.watcher.ChampionWatcher`, None for a fixed model) hands over
    new champions.
    Kafka and store errors propagate after the failed batch is rewound: the caller starts a new session.
    """
    from kafka.errors import KafkaError

    from pipeline.kafka.clients import poll_promptly
    from pipeline.kafka.producer import BulkProducer
    from pipeline.observability import LagTracker
    from pipeline.runtime import freeze_heap

    lag = LagTracker(LAG)
    codec = {"compression.type": settings.forecast.compression}
    producer = BulkProducer(settings, **codec)
    try:  # scores go through a producer of their own: confirming the forecasts does not wait for them
        scores = ScoreSender(settings, BulkProducer(settings, **codec), LiveAccuracy(settings.scoring.live_windows)) \
            if scoring.scorer is not None else None
    except BrokerUnavailable:
        producer.close(1.0)
        raise
    checkpoint.acknowledge = None if scores is None else scores.confirm  # before every save of the state

    def settled(batch: dict, step: Any, *args: Any) -> None:
        """``step(*args)``; a broker or store error (a score or forecast not acknowledged, a save that failed)
        takes what was processed since the last save back to it (the checkpoint's step 2), then raises."""
        try:
            step(*args)
        except (KafkaError, BrokerUnavailable, StoreUnavailable):
            checkpoint.rewind(batch)  # not committed: read it again, from the last saved state
            raise

    last_data = time.monotonic()
    clean = False
    try:
        while not shutdown.is_set():
            batch = poll_promptly(consumer, 200)
            checkpoint.raise_failed()
            if batch:
                checkpoint.gather(batch)  # a rebalance meanwhile drops what it moved from the batch
                try:
                    complete_batch(consumer, batch, settings.forecast.batch_wait_ms / 1000, BATCH_WAITS)
                finally:
                    checkpoint.gather(None)
                checkpoint.raise_failed()
                batch = {tp: records for tp, records in batch.items() if records}
            health.polled()
            lag.update(consumer, batch)
            if batch or not consumer.assignment():  # the idle clock runs only while assigned
                last_data = time.monotonic()
            if batch:
                checkpoint.begin(batch)
                settled(batch, process_batch, batch, forecaster, producer, checkpoint, settings, scoring.scorer,
                        scores)
            elif exit_when_idle_s is not None and time.monotonic() - last_data > exit_when_idle_s:
                log.info("no windows for %.1fs; exiting", exit_when_idle_s)
                break
            else:
                settled({}, checkpoint.processed, {})  # a save that fell due while idle
            if watcher is not None:
                new = watcher.take()
                if new is not None:
                    settled({}, checkpoint.flush)  # what the old version served and scored is saved first
                    forecaster.swap(new)
                    scoring.swap(new)
                    freeze_heap()
                    # the watcher's "champion moved" comes earlier, when it has loaded the version: a batch
                    # polled meanwhile is still forecast with the old one. From this line on, every batch
                    # is forecast with the new version.
                    serving(new, health)
        settled({}, checkpoint.flush, True)  # written and committed before the session ends
        clean = True
    finally:
        checkpoint.acknowledge = None
        timeout_s = settings.observability.shutdown_timeout_s if clean else 1.0
        producer.close(timeout_s)
        if scores is not None:
            scores.close(timeout_s)


def rebalance_listener(forecaster: Forecaster, checkpoint: ForecastCheckpoint) -> Any:
    """A rebalance listener that logs the partitions the job gains and loses, tells ``forecaster``
    which it gained (:meth:`~models.serving.forecaster.Forecaster.assigned`), and saves and loads their scoring
    state (:class:`~models.serving.checkpoint.ForecastCheckpoint`)."""
    from kafka import ConsumerRebalanceListener

    class _AssignmentLog(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            if revoked:
                log.info("revoked partitions %s", sorted(tp.partition for tp in revoked))
            checkpoint.revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            if assigned:
                log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
            forecaster.assigned(tp.partition for tp in assigned)
            try:
                checkpoint.assigned(assigned)
            except Exception as e:  # kafka-python 3.0 re-raises it wrapped, others only log it: kept for the session
                checkpoint.failed = checkpoint.failed or e
                raise

    return _AssignmentLog()


def process_batch(batch: dict, forecaster: Forecaster, producer: BulkProducer, checkpoint: ForecastCheckpoint,
                  settings: Settings, scorer: Scorer | None = None, scores: ScoreSender | None = None) -> None:
    """Windows of one poll -> forecasts acknowledged by the broker -> scores handed to ``scores`` -> offsets
    processed (the checkpoint saves the scoring state and commits them when due, once the scores are
    acknowledged too: steps 2 and 3 of :mod:`models.serving.checkpoint`).

    One batched inference (:meth:`~models.serving.forecaster.Forecaster.infer`); with ``scorer`` (scoring
    on), the batch's windows settle earlier forecasts and the scorer issues this batch's
    (:meth:`~models.scoring.scorer.Scorer.score_batch`); the forecasts are sent and confirmed, then the
    scores are built and sent in the background (:class:`~models.serving.score_sender.ScoreSender`)."""
    from kafka import OffsetAndMetadata

    t_start, wall_start = time.perf_counter(), time.time()
    keys: list[tuple[str, int]] = []
    tables: list[pa.Table] = []
    oldest_ts = None
    commits = {}
    fresh: list[tuple[int, pa.Table]] = []
    for tp, records in batch.items():
        for rec in records:
            try:
                table = decode_windows(rec.value)
                table.select(["series", "window_end", "count", forecaster.target])
            except (pa.ArrowException, KeyError, ValueError) as e:  # not a windows message: skip it, say where
                SKIPPED.labels("bad_message").inc()
                log.error("skipping an undecodable message at %s[%d] offset %d: %s",
                          tp.topic, tp.partition, rec.offset, e)
                continue
            WINDOWS_IN.inc(table.num_rows)
            keys.extend(forecaster.add(table))
            tables.append(table)
            fresh.append((tp.partition, table))
            oldest_ts = rec.timestamp if oldest_ts is None else min(oldest_ts, rec.timestamp)
        commits[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
    forecaster.refresh(fresh)  # series of partitions assigned since: what another consumer read meanwhile
    SERIES.set(len(forecaster.buffers))
    STAGE_S.labels("decode").observe(time.perf_counter() - t_start)
    if oldest_ts is not None:  # clocks of producer and job may differ: a figure for one machine
        STAGE_S.labels("arrival").observe(max(0.0, wall_start - oldest_ts / 1000))
    topic = settings.topics.forecasts
    parts = forecaster.partitions_of(topic, producer)
    sent, sending = 0, 0.0
    scored: Emitted | None = None
    inference = forecaster.infer(keys, issued_at=int(time.time() * 1000), batch=tables, always=scorer is not None)
    if inference is not None:
        issued = None
        if scorer is not None:
            t1 = time.perf_counter()
            scored_batch = scorer.score_batch(inference, tables, [p for p, _ in fresh], forecaster.target,
                                              settings.model.season)
            scored = scored_batch.emitted
            if scored_batch.repeats_not_held:
                SKIPPED.labels("repeat_sent_before").inc(scored_batch.repeats_not_held)
            issued = scored_batch.forecasts()
            STAGE_S.labels("scoring").observe(time.perf_counter() - t1)
        # librdkafka sends each chunk while the next one's JSON is built
        for messages in forecaster.messages(inference, issued):
            t0 = time.perf_counter()
            producer.send(topic, [(key.encode(), value, parts[key]) for key, value in messages])
            sent += len(messages)
            sending += time.perf_counter() - t0
    t0 = time.perf_counter()
    # checkpoint step 2: raises unless the broker acknowledged every forecast: then offsets stay uncommitted
    producer.confirm(topic, timeout_s=settings.observability.shutdown_timeout_s)
    t2 = time.perf_counter()
    STAGE_S.labels("send").observe(sending + t2 - t0)
    FORECASTS.inc(sent)
    if oldest_ts is not None:
        END_TO_END_S.observe(max(0.0, time.time() - oldest_ts / 1000))
    if scored and scores is not None:  # built and sent off this path; acknowledged before the state is saved
        scores.submit(scored, forecaster.partitions_of(settings.topics.scores, producer),
                      forecaster.partitions_of(settings.topics.anomalies, producer) if scored.anomaly_count else None)
    checkpoint.processed(commits)  # checkpoint steps 3, and 4 and 5 when a save is due
    STAGE_S.labels("commit").observe(time.perf_counter() - t2)

