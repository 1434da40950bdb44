"""Publish a rolling forecast for every series each time one of its windows closes.

Consumes the windows topic in a consumer group, keeps the last L windows of
each series in memory (rebuilt from the history store on start, so it can
forecast at once), and for every batch of closed windows runs one batched
inference (eager PyTorch, or the version's ONNX graph in ONNX Runtime with
``forecast.runtime = "onnxruntime"``) with the model that carries the `champion` alias
in MLflow, producing one JSON forecast per (series, window) to the forecasts
topic through librdkafka (:class:`~pipeline.kafka.producer.BulkProducer`; thousands of
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
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Settings
from pipeline.runtime import Shutdown

if TYPE_CHECKING:
    from models.serving.forecaster import LoadedModel

HELP = "publish rolling forecasts from the champion model for every closed window"

log = logging.getLogger("rollcast.forecast")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-when-idle", type=float, metavar="SECONDS",
        help="exit 0 after no window arrived for this long (tests, benchmarks)",
    )
    parser.add_argument("--model-dir", type=Path, help="serve this saved model instead of the MLflow champion")


def run(settings: Settings, args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from models.serving import telemetry as metrics
    from models.serving import watcher as champion_watch
    from models.serving.checkpoint import ForecastCheckpoint
    from models.serving.forecaster import Forecaster, load_saved_model
    from models.serving.session import LiveScoring, forecast_session, rebalance_listener, serving
    from pipeline.config import require_bootstrap
    from pipeline.errors import BrokerUnavailable, StoreUnavailable
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
        model: LoadedModel | None = load_saved_model(args.model_dir, "local",
                                                     compiled=settings.forecast.runtime == "onnxruntime")
    else:
        model = champion_watch.wait_for_champion(settings, shutdown, health, on_reachable=metrics.MLFLOW_UP.set)
    if model is None:
        return 0
    serving(model, health, waiting_for=None)

    forecaster = Forecaster(settings, model)
    forecaster.rebuild()
    scoring = LiveScoring(settings, model)
    log.debug("%d start-up objects exempt from garbage collection", freeze_heap())
    watcher = None if args.model_dir else \
        champion_watch.ChampionWatcher(settings, model, metrics.MLFLOW_UP.set).start()
    # The consumer is kept across sessions (it rejoins its group by itself; a failed batch is rewound, so
    # windows whose forecasts were not acknowledged are read again); each session has a new producer (an
    # idempotent one is refused by a broker that lost its producer id). The in-memory context is kept:
    # re-reading a window replaces it with the same values.
    consumer = make_consumer(settings, settings.groups.forecast)
    checkpoint = ForecastCheckpoint(settings, consumer, lambda: scoring.scorer)
    consumer.subscribe([settings.topics.windows], listener=rebalance_listener(forecaster, checkpoint))
    try:
        ok = retry_sessions(
            lambda: forecast_session(settings, forecaster, consumer, checkpoint, shutdown, health,
                                     scoring=scoring, watcher=watcher, exit_when_idle_s=args.exit_when_idle),
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
