"""Publish a rolling forecast for every series each time one of its windows closes.

Consumes the windows topic in a consumer group, keeps the last L windows of
each series in memory (rebuilt from the history store on start, so it can
forecast at once), and for every batch of closed windows runs one batched
inference in plain PyTorch with the model that carries the `champion` alias
in MLflow, producing one JSON forecast per (series, window) to the forecasts
topic. Offsets of the windows topic are committed only after the broker has
acknowledged the forecasts for them. The alias is checked every
forecast.champion_poll_s; a new champion is swapped in between batches. With
no champion yet the job waits; if MLflow is unreachable it keeps serving the
model it has.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from prometheus_client import Counter, Gauge, Histogram

from pipeline.config import Settings
from pipeline.errors import MlflowUnavailable
from pipeline.windows_io import decode_windows

HELP = "publish rolling forecasts from the champion model for every closed window"

log = logging.getLogger("rollcast.forecast")

FORECASTS = Counter("rollcast_forecast_forecasts_total", "Forecast messages produced")
WINDOWS_IN = Counter("rollcast_forecast_windows_total", "Windows consumed from the windows topic")
SKIPPED = Counter("rollcast_forecast_skipped_total", "Windows not forecast, by reason", ["reason"])
INFERENCE_S = Histogram(
    "rollcast_forecast_inference_seconds", "Batched inference time per batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
END_TO_END_S = Histogram(
    "rollcast_forecast_end_to_end_seconds",
    "From a window message's broker timestamp until its forecast is acknowledged",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_VERSION = Gauge("rollcast_forecast_model_version", "Registered model version in use (0: none)")
MLFLOW_UP = Gauge("rollcast_forecast_mlflow_reachable", "1 if the last champion check reached MLflow")
SERIES = Gauge("rollcast_forecast_series", "Series held in memory")
LAG = Gauge("rollcast_forecast_consumer_lag", "Windows messages behind the partition's end", ["partition"])

BUFFER_SLACK = 32  # windows kept beyond L so repeats after a restart still find their context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-when-idle", type=float, metavar="SECONDS",
        help="exit 0 after no window arrived for this long (tests, benchmarks)",
    )
    parser.add_argument("--model-dir", type=Path, help="serve this saved model instead of the MLflow champion")


# --------------------------------------------------------------------------- state


@dataclass
class SeriesBuffer:
    """The most recent windows of one series: window ends and target values, sorted, bounded."""

    capacity: int
    ends: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def put(self, end: int, value: float) -> None:
        """Insert or replace the window ending at ``end`` (repeats after a restart replace)."""
        if not self.ends or end > self.ends[-1]:
            self.ends.append(end)
            self.values.append(value)
        else:
            i = bisect.bisect_left(self.ends, end)
            if i < len(self.ends) and self.ends[i] == end:
                self.values[i] = value
            else:
                self.ends.insert(i, end)
                self.values.insert(i, value)
        if len(self.ends) > self.capacity:
            del self.ends[: len(self.ends) - self.capacity]
            del self.values[: len(self.values) - self.capacity]

    def context(self, end: int, length: int, step_ms: int) -> np.ndarray | None:
        """The target values of the ``length`` windows ending exactly at ``end``, on a regular grid;
        None when the buffer cannot supply them."""
        i = bisect.bisect_right(self.ends, end)
        if i < length or self.ends[i - 1] != end:
            return None
        if self.ends[i - 1] - self.ends[i - length] != (length - 1) * step_ms:
            return None
        return np.asarray(self.values[i - length : i], dtype=np.float64)


@dataclass
class LoadedModel:
    name: str
    version: str
    module: Any
    context: int
    horizon: int
    quantiles: list[float]


def load_saved_model(model_dir: Path, version: str) -> LoadedModel:
    import models

    module = models.load_model(model_dir)
    cfg = module.config
    return LoadedModel(
        name=module.name,
        version=str(version),
        module=module,
        context=int(cfg.context),
        horizon=int(cfg.horizon),
        quantiles=[float(q) for q in cfg.quantiles],
    )


# --------------------------------------------------------------------------- messages


def forecast_messages(
    series: list[str],
    last_ends: list[int],
    preds: np.ndarray,
    model: LoadedModel,
    step_ms: int,
    issued_at: int,
) -> list[tuple[str, bytes]]:
    """One JSON forecast per row of ``preds`` (B, H, Q), in DESIGN.md's format.

    Point ``h`` (1-based) covers the window starting at ``last_window_end + (h-1)*step_ms``;
    its ``ts`` is that window's start, matching ``window_start`` in the history store.
    """
    # Built column-wise by polars and serialised in one write_ndjson call: about half the time of
    # per-message dicts through a JSON encoder, which matters at 1,000+ forecasts per batch.
    preds = np.asarray(preds, dtype=np.float64)
    n, horizon, _ = preds.shape
    if n == 0:
        return []
    qkeys = [f"{q:g}" for q in model.quantiles]
    median = model.quantiles.index(0.5)
    ends = np.asarray(last_ends, dtype=np.int64)
    flat = pl.DataFrame(
        {
            "ts": (ends[:, None] + np.arange(horizon, dtype=np.int64)[None] * step_ms).ravel(),
            "mean": preds[:, :, median].ravel(),
            **{k: preds[:, :, j].ravel() for j, k in enumerate(qkeys)},
        }
    )
    points = flat.select(pl.struct("ts", "mean", pl.struct(qkeys).alias("quantiles")).alias("p"))["p"]
    frame = pl.DataFrame(
        {"series": series, "issued_at": np.full(n, issued_at, dtype=np.int64), "last_window_end": ends}
    ).with_columns(
        pl.struct(pl.lit(model.name).alias("name"), pl.lit(model.version).alias("version")).alias("model"),
        pl.lit(step_ms, dtype=pl.Int64).alias("step_ms"),
        points.reshape((n, horizon)).cast(pl.List(points.dtype)).alias("points"),
    )
    lines = frame.write_ndjson().encode().splitlines()
    return list(zip(series, lines, strict=True))


# --------------------------------------------------------------------------- the job


class Forecaster:
    """In-memory context of every series plus the model serving them."""

    def __init__(self, settings: Settings, model: LoadedModel):
        self.settings = settings
        self.model = model
        self.step_ms = settings.window.length_ms
        self.target = settings.window.target
        self.capacity = max(settings.model.context, model.context) + BUFFER_SLACK
        self.buffers: dict[str, SeriesBuffer] = {}
        self.watcher: ChampionWatcher | None = None

    def swap(self, model: LoadedModel) -> None:
        if model.context + BUFFER_SLACK > self.capacity:
            self.capacity = model.context + BUFFER_SLACK
            self.rebuild()
        self.model = model

    def rebuild(self) -> None:
        """Reload the last windows of every series from the history store."""
        from pipeline.store import HistoryStore

        frame = HistoryStore(self.settings).last_windows(self.capacity)
        self.buffers.clear()
        self.add(frame.to_arrow())
        SERIES.set(len(self.buffers))
        log.info("rebuilt context of %d series from the history store", len(self.buffers))

    def add(self, table: pa.Table) -> list[tuple[str, int]]:
        """Put windows into the buffers; return their (series, window_end) in arrival order."""
        series, ends, values = target_values(table, self.target)
        for s, e, v in zip(series, ends, values, strict=True):
            buf = self.buffers.get(s)
            if buf is None:
                buf = self.buffers[s] = SeriesBuffer(self.capacity)
            buf.put(e, v)
        return list(zip(series, ends, strict=True))

    def forecast(self, keys: Iterable[tuple[str, int]], issued_at: int) -> list[tuple[str, bytes]]:
        """One batched inference over every (series, window_end) with enough context."""
        import models

        rows, ok_series, ok_ends = [], [], []
        length = self.model.context
        keys = list(dict.fromkeys(keys))
        # Windows older than the buffer (a lagging batch holding more than `capacity` windows of a
        # series, e.g. after a restart): one store read per series for all of them, not one per window
        # (per-window reads took minutes for a few thousand windows and stalled the job).
        older = {(s, end) for s, end in keys
                 if self.buffers[s].ends and self.buffers[s].ends[0] > end - (length - 1) * self.step_ms}
        older_ends: dict[str, list[int]] = {}
        for s, end in older:
            older_ends.setdefault(s, []).append(end)
        stored = {s: self._buffer_from_store(s, min(ends), max(ends), length) for s, ends in older_ends.items()}
        for s, end in keys:
            ctx = self.buffers[s].context(end, length, self.step_ms)
            if ctx is None and (s, end) in older:
                ctx = stored[s].context(end, length, self.step_ms)  # older than the buffer: lagging
            if ctx is None:
                SKIPPED.labels("short_context").inc()
                continue
            if np.isnan(ctx[0]):  # gap rows are forward-filled; a context cannot start with one
                SKIPPED.labels("leading_gap").inc()
                continue
            rows.append(ctx)
            ok_series.append(s)
            ok_ends.append(end)
        if not rows:
            return []
        ends = np.asarray(ok_ends, dtype=np.int64)[:, None] - self.step_ms * np.arange(length - 1, -1, -1)
        t0 = time.perf_counter()
        preds = models.predict(self.model.module, np.stack(rows), window_end_ms=ends)
        INFERENCE_S.observe(time.perf_counter() - t0)
        return forecast_messages(ok_series, ok_ends, np.asarray(preds), self.model, self.step_ms, issued_at)

    def _buffer_from_store(self, series: str, first_end: int, last_end: int, length: int) -> SeriesBuffer:
        """The stored windows of ``series`` that supply the contexts of windows ending in
        [first_end, last_end] (older than the in-memory buffer: after a restart with lag)."""
        from pipeline.store import HistoryStore

        frame = HistoryStore(self.settings).read(series=series, start_ms=first_end - length * self.step_ms,
                                                 end_ms=last_end)
        buf = SeriesBuffer(max(length, frame.height))
        _, ends, values = target_values(frame.to_arrow(), self.target)
        for e, v in zip(ends, values, strict=True):
            buf.put(e, v)
        return buf


def target_values(table: pa.Table, target: str) -> tuple[list[str], list[int], list[float]]:
    """Series, window ends and target values of a windows table; NaN where a window is a gap
    (``count = 0``), except for the ``count`` target itself."""
    values = table.column(target).to_numpy(zero_copy_only=False).astype(np.float64)
    if target != "count":
        values = np.where(table.column("count").to_numpy(zero_copy_only=False) > 0, values, np.nan)
    return table.column("series").to_pylist(), table.column("window_end").to_pylist(), values.tolist()


class Shutdown:
    """SIGTERM/SIGINT set a flag; the loop finishes its batch, commits and exits."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.requested = False
        self.timeout_s = timeout_s
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, signum: int, frame: object) -> None:
        from pipeline.observability import exit_after

        log.info("received signal %d; finishing the current batch", signum)
        if not self.requested and self.timeout_s is not None:
            exit_after(self.timeout_s, "forecast")
        self.requested = True


def wait_for_champion(settings: Settings, shutdown: Shutdown, health: Any) -> LoadedModel | None:
    """Block until the registered model has a champion (None if asked to shut down first)."""
    from jobs import registry

    said, down = False, False
    while not shutdown.requested:
        try:
            found = registry.champion(settings)
            MLFLOW_UP.set(1)
            down = False
        except MlflowUnavailable as e:  # say so (once per outage) and keep waiting
            MLFLOW_UP.set(0)
            if not down:
                log.warning("MLflow unreachable while looking for a champion: %s", e)
            down, found = True, None
        if found is not None:
            version, model_dir = found
            return load_saved_model(model_dir, version)
        if not said:
            log.info("no %r alias on %s yet; waiting for the first promoted model",
                     settings.mlflow.champion_alias, settings.mlflow.registered_model)
            said = True
        health.facts["waiting_for"] = "champion"
        health.polled()
        time.sleep(min(settings.forecast.champion_poll_s, 2.0))
    return None


class ChampionWatcher:
    """Watches the champion alias in a background thread, so MLflow never blocks the consume loop.

    Every ``forecast.champion_poll_s`` it resolves the alias; when it has moved, it downloads
    and loads the new version off the loop and leaves it for :meth:`take`, which the loop calls
    between batches. While MLflow is unreachable it backs off (up to 30 s), logs one warning
    per outage and one line when MLflow is back, and the loop keeps serving the model it has.
    """

    def __init__(self, settings: Settings, current: LoadedModel):
        import threading

        self.settings = settings
        self.version = current.version
        self._pending: LoadedModel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)

    def start(self) -> ChampionWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> LoadedModel | None:
        """The new champion, loaded, if the alias moved since the last call."""
        with self._lock:
            model, self._pending = self._pending, None
        return model

    def _run(self) -> None:
        from jobs import registry

        poll = self.settings.forecast.champion_poll_s
        wait, down_since = poll, None
        while not self._stop.wait(wait):
            try:
                found = registry.champion(self.settings)
            except MlflowUnavailable as e:
                MLFLOW_UP.set(0)
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("MLflow unreachable (%s); still serving version %s", e, self.version)
                wait = min(max(wait * 2, 1.0), 30.0)
                continue
            MLFLOW_UP.set(1)
            if down_since is not None:
                log.info("MLflow reachable again after %.0fs", time.monotonic() - down_since)
                down_since = None
            wait = poll
            if found is None or found[0] == self.version:
                continue
            version, model_dir = found
            model = load_saved_model(model_dir, version)
            log.info("champion moved: version %s -> %s (%s)", self.version, version, model.name)
            with self._lock:
                self._pending = model
            self.version = version


def run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.config import require_bootstrap
    from pipeline.kafka import ensure_topics
    from pipeline.observability import BrokerProbe, Health, serve_http

    if settings.forecast.inference_threads is not None:
        import torch

        torch.set_num_threads(settings.forecast.inference_threads)
    shutdown = Shutdown(settings.observability.shutdown_timeout_s)
    health = Health("forecast", poll_interval_s=max(60.0, settings.forecast.champion_poll_s * 3))
    if settings.observability.metrics_port is not None:
        serve_http(settings.observability.metrics_port, health)
    probe = BrokerProbe(health, require_bootstrap(settings)).start()
    ensure_topics(settings)

    if args.model_dir:
        model: LoadedModel | None = load_saved_model(args.model_dir, "local")
    else:
        model = wait_for_champion(settings, shutdown, health)
    if model is None:
        return 0
    MODEL_VERSION.set(float(model.version) if model.version.isdigit() else -1)
    health.facts.update(waiting_for=None, model=model.name, model_version=model.version)

    forecaster = Forecaster(settings, model)
    forecaster.rebuild()
    if not args.model_dir:
        forecaster.watcher = ChampionWatcher(settings, model).start()
    try:
        return _serve_with_retries(settings, args, forecaster, shutdown, health)
    finally:
        probe.stop()
        if forecaster.watcher is not None:
            forecaster.watcher.stop()


def _serve_with_retries(settings: Settings, args: argparse.Namespace, forecaster: Forecaster,
                        shutdown: Shutdown, health: Any) -> int:
    """Run :func:`_serve` until asked to stop; after a Kafka error, back off and start a new session.

    The consumer is kept (it rejoins its group by itself; the failed batch was
    rewound, so windows whose forecasts were not acknowledged are read again);
    the producer is new (an idempotent one is refused by a broker that lost
    its producer id) and the topics are created again if the broker lost them.
    The in-memory context is kept: re-reading a window replaces it with the
    same values. One warning per outage; retries log at debug.
    """
    from kafka.errors import KafkaError

    from pipeline.errors import BrokerUnavailable
    from pipeline.kafka import Backoff, ensure_topics, make_consumer

    consumer = make_consumer(settings, settings.groups.forecast, settings.topics.windows)
    backoff, failing = Backoff(), False
    try:
        while not shutdown.requested:
            try:
                if failing:
                    ensure_topics(settings)
                return _serve(settings, args, forecaster, consumer, shutdown, health)
            except (KafkaError, BrokerUnavailable) as e:
                health.facts["last_error"] = f"{type(e).__name__}: {e}"
                if shutdown.requested:
                    log.error("could not finish the last batch (%s); a restart forecasts it again", e)
                    return 1
                if not failing:
                    log.warning("Kafka error in the forecast loop (%s: %s); retrying the batch with a new "
                                "producer", type(e).__name__, e)
                else:
                    log.debug("still failing: %s", e)
                failing = True
                backoff.sleep(lambda: shutdown.requested)
    finally:
        try:
            consumer.close(autocommit=False)
        except Exception as e:  # noqa: BLE001 - leaving the group while the broker is down
            log.debug("closing the consumer: %s", e)
    return 0


def _serve(settings: Settings, args: argparse.Namespace, forecaster: Forecaster, consumer: Any,
           shutdown: Shutdown, health: Any) -> int:
    """One producer session: poll windows, forecast, commit, swap in a new champion."""
    from kafka.errors import KafkaError

    from pipeline.kafka import make_producer
    from pipeline.observability import LagTracker

    lag = LagTracker(LAG)
    producer = make_producer(settings)
    last_data = time.monotonic()
    clean = False
    try:
        while not shutdown.requested:
            batch = consumer.poll(timeout_ms=200)
            health.polled()
            lag.update(consumer, batch)
            if batch or not consumer.assignment():  # the idle clock runs only while assigned
                last_data = time.monotonic()
            if batch:
                try:
                    process_batch(batch, forecaster, producer, consumer, settings)
                except KafkaError:
                    _rewind(consumer, batch)  # not committed: read it again
                    raise
            elif args.exit_when_idle is not None and time.monotonic() - last_data > args.exit_when_idle:
                log.info("no windows for %.1fs; exiting", args.exit_when_idle)
                break
            if forecaster.watcher is not None:
                new = forecaster.watcher.take()
                if new is not None:
                    forecaster.swap(new)
                    MODEL_VERSION.set(float(new.version) if new.version.isdigit() else -1)
                    health.facts.update(model=new.name, model_version=new.version)
        clean = True
    finally:
        producer.close(timeout=settings.observability.shutdown_timeout_s if clean else 1.0)
    return 0


def _rewind(consumer: Any, batch: dict) -> None:
    """Seek every still-assigned partition of ``batch`` back to its first record."""
    assigned = consumer.assignment()
    for tp, records in batch.items():
        if records and tp in assigned:
            consumer.seek(tp, records[0].offset)


def process_batch(batch: dict, forecaster: Forecaster, producer: Any, consumer: Any, settings: Settings) -> None:
    """Windows of one poll -> forecasts acknowledged by the broker -> offsets committed."""
    from kafka import OffsetAndMetadata

    keys: list[tuple[str, int]] = []
    oldest_ts = None
    commits = {}
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
            oldest_ts = rec.timestamp if oldest_ts is None else min(oldest_ts, rec.timestamp)
        commits[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
    SERIES.set(len(forecaster.buffers))
    messages = forecaster.forecast(keys, issued_at=int(time.time() * 1000))
    futures = [producer.send(settings.topics.forecasts, value, key=key.encode()) for key, value in messages]
    producer.flush(timeout=settings.observability.shutdown_timeout_s)
    for f in futures:
        f.get(timeout=30)  # raises if the broker did not acknowledge: offsets stay uncommitted
    FORECASTS.inc(len(messages))
    if oldest_ts is not None:
        END_TO_END_S.observe(max(0.0, time.time() - oldest_ts / 1000))
    # bounded: kafka-python retries a commit forever while the coordinator is unknown
    consumer.commit(commits, timeout_ms=int(settings.observability.shutdown_timeout_s * 1000))
