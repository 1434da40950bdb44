"""Publish a rolling forecast for every series each time one of its windows closes.

Consumes the windows topic in a consumer group, keeps the last L windows of
each series in memory (rebuilt from the history store on start, so it can
forecast at once), and for every batch of closed windows runs one batched
inference in plain PyTorch with the model that carries the `champion` alias
in MLflow, producing one JSON forecast per (series, window) to the forecasts
topic through librdkafka (:class:`~pipeline.kafka.clients.BulkProducer`; thousands of
messages per batch). Offsets of the windows topic are committed only after the
broker has acknowledged the forecasts for them. The alias is checked every
forecast.champion_poll_s; a new champion is loaded off the loop ("champion
moved: ...") and swapped in between batches ("serving version N (...)": the
batches after that line are forecast with it). With no champion yet the job
waits; if MLflow is unreachable it keeps serving the model it has.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from prometheus_client import Counter, Gauge, Histogram

from models.scoring.accuracy import LiveAccuracy
from models.serving.checkpoint import ScoringCheckpoint
from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable, StoreUnavailable
from pipeline.runtime import Shutdown
from pipeline.windows_io import complete_batch, decode_windows

if TYPE_CHECKING:
    from models.serving.forecaster import Forecaster, LoadedModel
    from pipeline.kafka.producer import BulkProducer

HELP = "publish rolling forecasts from the champion model for every closed window"

log = logging.getLogger("rollcast.forecast")

FORECASTS = Counter("rollcast_forecast_forecasts_total", "Forecast messages produced")
WINDOWS_IN = Counter("rollcast_forecast_windows_total", "Windows consumed from the windows topic")
END_TO_END_S = Histogram(
    "rollcast_forecast_end_to_end_seconds",
    "From a window message's broker timestamp until its forecast is acknowledged",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_VERSION = Gauge("rollcast_forecast_model_version", "Registered model version in use (0: none)")
MLFLOW_UP = Gauge("rollcast_forecast_mlflow_reachable", "1 if the last champion check reached MLflow")
BATCH_WAITS = Counter(
    "rollcast_forecast_batch_waits_total",
    "Polls whose windows batch announced partitions not yet fetched, by outcome: complete (the rest came "
    "within forecast.batch_wait_ms) or timeout (forecast without them; they follow as another batch)",
    ["outcome"],
)
LAG = Gauge("rollcast_forecast_consumer_lag", "Windows messages behind the partition's end", ["partition"])
SCORES = Counter("rollcast_forecast_scores_total", "Score messages produced (forecasts whose windows all closed)")
LIVE = {
    name: Gauge(f"rollcast_live_{name}", f"{what}, over the forecasts issued in the last scoring.live_windows "
                "windows, by model version", ["version"])
    for name, what in [
        ("mae", "Live MAE of the point forecast"),
        ("relative_mae", "Live MAE relative to seasonal naive on the same windows (< 1: better)"),
        ("coverage", "Live share of actuals inside the served outer interval (calibrated when calibration is on)"),
        ("model_coverage", "Live share of actuals inside the model's own outer interval"),
        ("points", "Scored forecast steps"),
    ]
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-when-idle", type=float, metavar="SECONDS",
        help="exit 0 after no window arrived for this long (tests, benchmarks)",
    )
    parser.add_argument("--model-dir", type=Path, help="serve this saved model instead of the MLflow champion")


def run(settings: Settings, args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from models.serving import watcher as champion_watch
    from models.serving.forecaster import Forecaster, load_saved_model
    from pipeline.config import require_bootstrap
    from pipeline.kafka.clients import ensure_topics, make_consumer
    from pipeline.observability import BrokerProbe, Health, serve_http
    from pipeline.runtime import freeze_heap, keep_freed_heap, retry_sessions

    if not keep_freed_heap():
        log.debug("not glibc: malloc thresholds left as they are")
    if settings.forecast.inference_threads is not None:
        import torch

        torch.set_num_threads(settings.forecast.inference_threads)
    shutdown = Shutdown("forecast", settings.observability.shutdown_timeout_s)
    health = Health("forecast", poll_interval_s=max(60.0, settings.forecast.champion_poll_s * 3))
    if settings.observability.metrics_port is not None:
        serve_http(settings.observability.metrics_port, health)
    probe = BrokerProbe(health, require_bootstrap(settings)).start()
    ensure_topics(settings)

    if args.model_dir:
        model: LoadedModel | None = load_saved_model(args.model_dir, "local")
    else:
        model = champion_watch.wait_for_champion(settings, shutdown, health, on_reachable=MLFLOW_UP.set)
    if model is None:
        return 0
    MODEL_VERSION.set(float(model.version) if model.version.isdigit() else -1)
    health.facts.update(waiting_for=None, model=model.name, model_version=model.version)
    log.info("serving version %s (%s)", model.version, model.name)

    forecaster = Forecaster(settings, model)
    forecaster.rebuild()
    log.debug("%d start-up objects exempt from garbage collection", freeze_heap())
    watcher = None if args.model_dir else champion_watch.ChampionWatcher(settings, model, MLFLOW_UP.set).start()
    # The consumer is kept across sessions (it rejoins its group by itself; a failed batch is rewound, so
    # windows whose forecasts were not acknowledged are read again); each session has a new producer (an
    # idempotent one is refused by a broker that lost its producer id). The in-memory context is kept:
    # re-reading a window replaces it with the same values.
    consumer = make_consumer(settings, settings.groups.forecast)
    checkpoint = ScoringCheckpoint(settings, consumer, lambda: forecaster.scorer)
    consumer.subscribe([settings.topics.windows], listener=_assignment_log(forecaster, checkpoint))
    try:
        ok = retry_sessions(
            lambda: _serve(settings, args, forecaster, watcher, consumer, checkpoint, shutdown, health),
            job="forecast", shutdown=shutdown, health=health,
            errors=(KafkaError, BrokerUnavailable, StoreUnavailable),
            resuming="retrying the batch with a new producer",
            before_retry=lambda: ensure_topics(settings),
        )
    finally:
        probe.stop()
        if watcher is not None:
            watcher.stop()
        try:
            consumer.close(autocommit=False)
        except Exception as e:  # noqa: BLE001 - leaving the group while the broker is down
            log.debug("closing the consumer: %s", e)
    return 0 if ok else 1


def _serve(settings: Settings, args: argparse.Namespace, forecaster: Forecaster, watcher: Any, consumer: Any,
           checkpoint: ScoringCheckpoint, shutdown: Shutdown, health: Any) -> None:
    """One producer session: poll windows, forecast and score, commit, swap in a new champion."""
    from kafka.errors import KafkaError

    from pipeline.kafka.clients import poll_promptly
    from pipeline.kafka.producer import BulkProducer
    from pipeline.observability import LagTracker
    from pipeline.runtime import freeze_heap

    lag = LagTracker(LAG)
    live = LiveAccuracy(settings.scoring.live_windows)
    producer = BulkProducer(settings, **{"compression.type": settings.forecast.compression})
    last_data = time.monotonic()
    clean = False
    try:
        while not shutdown.requested:
            batch = poll_promptly(consumer, 200)
            if batch:
                complete_batch(consumer, batch, settings.forecast.batch_wait_ms / 1000, BATCH_WAITS)
            health.polled()
            lag.update(consumer, batch)
            if batch or not consumer.assignment():  # the idle clock runs only while assigned
                last_data = time.monotonic()
            if batch:
                try:
                    checkpoint.begin(batch)
                    process_batch(batch, forecaster, producer, checkpoint, settings, live)
                except (KafkaError, BrokerUnavailable, StoreUnavailable):
                    checkpoint.rewind(batch)  # not committed: read it again, from the last saved state
                    raise
            elif args.exit_when_idle is not None and time.monotonic() - last_data > args.exit_when_idle:
                log.info("no windows for %.1fs; exiting", args.exit_when_idle)
                break
            else:
                checkpoint.processed({})  # a save that fell due while idle
            if watcher is not None:
                new = watcher.take()
                if new is not None:
                    checkpoint.flush()  # what the old version served and scored is saved first
                    forecaster.swap(new)
                    freeze_heap()
                    MODEL_VERSION.set(float(new.version) if new.version.isdigit() else -1)
                    health.facts.update(model=new.name, model_version=new.version)
                    # the watcher's "champion moved" comes earlier, when it has loaded the version: a batch
                    # polled meanwhile is still forecast with the old one. From this line on, every batch
                    # is forecast with the new version.
                    log.info("serving version %s (%s)", new.version, new.name)
        checkpoint.flush()
        clean = True
    finally:
        producer.close(settings.observability.shutdown_timeout_s if clean else 1.0)


def _assignment_log(forecaster: Forecaster, checkpoint: ScoringCheckpoint) -> Any:
    """A rebalance listener that logs the partitions the job gains and loses, tells ``forecaster``
    which it gained (:meth:`~models.serving.forecaster.Forecaster.assigned`), and saves and loads their scoring
    state (:class:`~models.serving.checkpoint.ScoringCheckpoint`)."""
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
            checkpoint.assigned(assigned)

    return _AssignmentLog()


def process_batch(batch: dict, forecaster: Forecaster, producer: BulkProducer, checkpoint: ScoringCheckpoint,
                  settings: Settings, live: LiveAccuracy | None = None) -> None:
    """Windows of one poll -> forecasts and scores acknowledged by the broker -> offsets committed (after
    the scoring state they cover is saved: :class:`~models.serving.checkpoint.ScoringCheckpoint`)."""
    from kafka import OffsetAndMetadata

    from models.serving.forecaster import SERIES, SKIPPED, STAGE_S

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
    # librdkafka sends each chunk while the next one's JSON is built
    for messages in forecaster.forecast(keys, issued_at=int(time.time() * 1000), batch=tables,
                                        partitions=[p for p, _ in fresh]):
        t0 = time.perf_counter()
        producer.send(topic, [(key.encode(), value, parts[key]) for key, value in messages])
        sent += len(messages)
        sending += time.perf_counter() - t0
    scored = forecaster.scored
    if scored:  # built once the forecasts are on their way
        t0 = time.perf_counter()
        score_parts = forecaster.partitions_of(settings.topics.scores, producer)
        producer.send(settings.topics.scores, [(key.encode(), value, score_parts[key])
                                               for key, value in scored.messages()])
        STAGE_S.labels("scores").observe(time.perf_counter() - t0)
    t0 = time.perf_counter()
    # raises unless the broker acknowledged every message: then offsets stay uncommitted
    producer.confirm(topic, timeout_s=settings.observability.shutdown_timeout_s)
    t2 = time.perf_counter()
    STAGE_S.labels("send").observe(sending + t2 - t0)
    FORECASTS.inc(sent)
    if oldest_ts is not None:
        END_TO_END_S.observe(max(0.0, time.time() - oldest_ts / 1000))
    if scored:
        SCORES.inc(len(scored))
        if live is not None:
            _report_live(live, scored.totals(), settings.window.length_ms)
    checkpoint.processed(commits)
    STAGE_S.labels("commit").observe(time.perf_counter() - t2)


def _report_live(live: LiveAccuracy, totals: list, step_ms: int) -> None:
    """Add a batch's scores to the sliding sums; set the gauges of the versions they concern."""
    versions = set()
    for version, origin, sums in totals:
        live.add(version, origin, step_ms, sums)
        versions.add(version)
    for version in versions:
        figures = live.totals(version).as_dict()
        for name, gauge in LIVE.items():
            gauge.labels(version).set(figures[name])
