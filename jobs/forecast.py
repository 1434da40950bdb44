"""Publish a rolling forecast for every series each time one of its windows closes.

Consumes the windows topic in a consumer group, keeps the last L windows of
each series in memory (rebuilt from the history store on start, so it can
forecast at once), and for every batch of closed windows runs one batched
inference in plain PyTorch with the model that carries the `champion` alias
in MLflow, producing one JSON forecast per (series, window) to the forecasts
topic through librdkafka (:class:`~pipeline.kafka.BulkProducer`; thousands of
messages per batch). Offsets of the windows topic are committed only after the
broker has acknowledged the forecasts for them. The alias is checked every
forecast.champion_poll_s; a new champion is swapped in between batches. With
no champion yet the job waits; if MLflow is unreachable it keeps serving the
model it has.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
from prometheus_client import Counter, Gauge, Histogram

from pipeline.config import Settings
from pipeline.errors import BrokerUnavailable, MlflowUnavailable, StoreUnavailable
from pipeline.windows_io import KeyPartitions, announced_missing, decode_windows

if TYPE_CHECKING:
    from pipeline.kafka import BulkProducer

HELP = "publish rolling forecasts from the champion model for every closed window"

log = logging.getLogger("rollcast.forecast")

FORECASTS = Counter("rollcast_forecast_forecasts_total", "Forecast messages produced")
WINDOWS_IN = Counter("rollcast_forecast_windows_total", "Windows consumed from the windows topic")
SKIPPED = Counter("rollcast_forecast_skipped_total", "Windows not forecast, by reason", ["reason"])
INFERENCE_S = Histogram(
    "rollcast_forecast_inference_seconds", "Batched inference time per batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
STAGE_S = Histogram(
    "rollcast_forecast_stage_seconds",
    "Time per batch in each stage: arrival (from the oldest window message's timestamp until the job "
    "starts on the batch), decode (windows into buffers), context, inference, messages (JSON), send "
    "(until the broker acknowledged them all), commit",
    ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
END_TO_END_S = Histogram(
    "rollcast_forecast_end_to_end_seconds",
    "From a window message's broker timestamp until its forecast is acknowledged",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_VERSION = Gauge("rollcast_forecast_model_version", "Registered model version in use (0: none)")
MLFLOW_UP = Gauge("rollcast_forecast_mlflow_reachable", "1 if the last champion check reached MLflow")
SERIES = Gauge("rollcast_forecast_series", "Series held in memory")
BATCH_WAITS = Counter(
    "rollcast_forecast_batch_waits_total",
    "Polls whose windows batch announced partitions not yet fetched, by outcome: complete (the rest came "
    "within forecast.batch_wait_ms) or timeout (forecast without them; they follow as another batch)",
    ["outcome"],
)
LAG = Gauge("rollcast_forecast_consumer_lag", "Windows messages behind the partition's end", ["partition"])

BUFFER_SLACK = 32  # windows kept beyond L so repeats after a restart still find their context
# forecasts built and handed to the producer at a time: the broker receives (and readers can read) the
# first ones while the rest are built, instead of all of them after the last
MESSAGE_CHUNK = 250


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-when-idle", type=float, metavar="SECONDS",
        help="exit 0 after no window arrived for this long (tests, benchmarks)",
    )
    parser.add_argument("--model-dir", type=Path, help="serve this saved model instead of the MLflow champion")


# --------------------------------------------------------------------------- state


class ContextBuffers:
    """The most recent windows of every series, as one ring buffer per series in a 2-D array.

    Windows are aligned to the epoch, so window ``k`` of a series (``k = window_end // step_ms``)
    lives in slot ``k % capacity`` of the series' row, and ``window[row, slot]`` records which
    window is there. A context of ``L`` windows ending at ``k`` exists exactly when the ``L`` slots
    before it hold windows ``k - L + 1 .. k``: one vectorised gather and comparison for a whole
    batch of series (a per-series Python buffer cost ~6 us a series, 60 ms for 10,000). A window
    older than the one in its slot is not stored (it is beyond the last ``capacity`` windows); a
    repeat (same window, after a restart) replaces the value; a window whose end is not a multiple
    of ``step_ms`` (another window length) is neither stored nor given a context.
    """

    def __init__(self, capacity: int, step_ms: int):
        self.capacity = capacity
        self.step_ms = step_ms
        self.rows: dict[str, int] = {}
        self.values = np.full((0, capacity), np.nan)
        self.window = np.full((0, capacity), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def row_of(self, series: list[str]) -> np.ndarray:
        """Rows of ``series``, adding rows for new ones."""
        rows = self.rows
        out = np.empty(len(series), dtype=np.int64)
        for i, s in enumerate(series):
            r = rows.get(s)
            if r is None:
                r = rows[s] = len(rows)
            out[i] = r
        if len(rows) > len(self.values):
            grow = max(len(rows), 2 * len(self.values), 64) - len(self.values)
            self.values = np.vstack([self.values, np.full((grow, self.capacity), np.nan)])
            self.window = np.vstack([self.window, np.full((grow, self.capacity), -1, dtype=np.int64)])
        return out

    def put(self, series: list[str], ends: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Store windows (``ends`` in ms); return their rows."""
        rows = self.row_of(series)
        k = np.asarray(ends, dtype=np.int64) // self.step_ms
        order = np.argsort(k, kind="stable")  # within a batch the newest write to a slot wins
        r, k, v = rows[order], k[order], np.asarray(values, dtype=np.float64)[order]
        slot = k % self.capacity
        aligned = np.asarray(ends, dtype=np.int64)[order] % self.step_ms == 0  # else another window length
        keep = (k >= self.window[r, slot]) & aligned
        self.window[r[keep], slot[keep]] = k[keep]
        self.values[r[keep], slot[keep]] = v[keep]
        return rows

    def contexts(self, rows: np.ndarray, ends: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Contexts ``(B, length)`` of the windows ending at ``ends`` for ``rows``, and two masks:
        ``ok`` (all ``length`` windows held) and ``evicted`` (some were replaced by newer ones:
        older than the buffer, e.g. a lagging batch after a restart)."""
        k = np.asarray(ends, dtype=np.int64) // self.step_ms
        back = np.arange(length - 1, -1, -1)
        want = k[:, None] - back  # (B, L) window numbers
        # their slots, want % capacity, with one modulo per row (a modulo per element took half the time),
        # and one flat gather per array (2-D fancy indexing: ~2x slower): 0.75 -> 0.35 ms for 1,000 x 96
        slots = (k % self.capacity)[:, None] - back
        if length <= self.capacity:
            slots += self.capacity * (slots < 0)
        else:
            slots %= self.capacity
        flat = slots + (np.asarray(rows, dtype=np.int64) * self.capacity)[:, None]
        held = np.take(self.window, flat)
        ok = (held == want).all(axis=1) & (np.asarray(ends) % self.step_ms == 0)
        evicted = ~ok & (held > want).any(axis=1)
        return np.take(self.values, flat), ok, evicted


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


def forecast_message_chunks(
    series: list[str],
    last_ends: list[int] | np.ndarray,
    preds: np.ndarray,
    model: LoadedModel,
    step_ms: int,
    issued_at: int,
    chunk: int | None = None,
) -> Iterator[list[tuple[str, bytes]]]:
    """One JSON forecast per row of ``preds`` (B, H, Q), in DESIGN.md's format, as ``(series, bytes)``
    pairs in lists of ``chunk`` (one list of all if None).

    Point ``h`` (1-based) covers the window starting at ``last_window_end + (h-1)*step_ms``;
    its ``ts`` is that window's start, matching ``window_start`` in the history store.
    The text of every point is built for the whole batch in one pass; only the documents are
    assembled per chunk, so a caller can send each chunk while the next is assembled. Building
    everything per chunk instead repeated polars' per-call overhead (~0.5 ms a call of 250).
    """
    # The JSON text is assembled column-wise by polars string expressions (one pass over all points,
    # then one join per message): ~1/3 less time than building nested structs for write_ndjson, and
    # several times faster than per-message dicts through a JSON encoder, at 1,000+ forecasts a batch.
    # Values are the model's float32 outputs, written as the shortest decimal that reads back as
    # that float32 (``99.33948``, not float64's ``99.3394775390625``): no precision is lost, and the
    # messages are a quarter smaller to build, send, store and parse. Non-finite values become null.
    preds = np.asarray(preds, dtype=np.float32)
    n, horizon, _ = preds.shape
    if n == 0:
        return
    median = model.quantiles.index(0.5)
    ends = np.asarray(last_ends, dtype=np.int64)

    finite = bool(np.isfinite(preds).all())

    def number(values: np.ndarray) -> pl.Expr:
        x = pl.lit(pl.Series(values.ravel()))
        return x.cast(pl.String) if finite else pl.when(x.is_finite()).then(x.cast(pl.String)).otherwise(pl.lit("null"))

    ts = (ends[:, None] + np.arange(horizon, dtype=np.int64)[None] * step_ms).ravel()
    # each quantile's text once (the mean is the median's text), all of them in one parallel query
    texts = [pl.lit(t) for t in pl.select([number(preds[:, :, j]).alias(str(j))
                                           for j in range(len(model.quantiles))]).get_columns()]
    parts: list[pl.Expr] = [pl.lit('{"ts":'), pl.lit(pl.Series(ts)).cast(pl.String),
                            pl.lit(',"mean":'), texts[median]]
    for j, q in enumerate(model.quantiles):
        parts += [pl.lit((',"quantiles":{' if j == 0 else ",") + json.dumps(f"{q:g}") + ":"), texts[j]]
    parts.append(pl.lit("}}"))
    points = pl.select(pl.concat_str(parts))[:, 0].reshape((n, horizon)).arr.join(",")
    names = pl.Series(series, dtype=pl.String)
    if names.str.contains(r'["\\\x00-\x1f]').any():  # needs escaping: let the JSON encoder do it
        names = pl.Series([json.dumps(x) for x in series], dtype=pl.String)
    else:
        names = '"' + names + '"'
    head = (f',"issued_at":{int(issued_at)},"last_window_end":')
    mid = (',"model":' + json.dumps({"name": model.name, "version": model.version}, separators=(",", ":"))
           + f',"step_ms":{int(step_ms)},"points":[')
    ends_text = pl.Series(ends).cast(pl.String)
    step = chunk or n
    for lo in range(0, n, step):
        lines = pl.select(pl.concat_str([
            pl.lit('{"series":'), pl.lit(names[lo:lo + step]), pl.lit(head), pl.lit(ends_text[lo:lo + step]),
            pl.lit(mid), pl.lit(points[lo:lo + step]), pl.lit("]}"),
        ]).cast(pl.Binary))[:, 0].to_list()
        yield list(zip(series[lo:lo + step], lines, strict=True))


# --------------------------------------------------------------------------- the job


class Forecaster:
    """In-memory context of every series plus the model serving them."""

    def __init__(self, settings: Settings, model: LoadedModel):
        self.settings = settings
        self.model = model
        self.step_ms = settings.window.length_ms
        self.target = settings.window.target
        self.capacity = max(settings.model.context, model.context) + BUFFER_SLACK
        self.buffers = ContextBuffers(self.capacity, self.step_ms)
        self.watcher: ChampionWatcher | None = None
        self._partitions: KeyPartitions | None = None
        # windows partition -> series refreshed from the store since the partition was last assigned
        self._refreshed: dict[int, set[str]] = {}

    def partitions_of(self, topic: str, producer: BulkProducer) -> KeyPartitions:
        """Partition of each series in ``topic`` (the key's default-partitioner choice), memoised
        until the topic's partition count changes."""
        n = producer.partitions(topic)
        if n == 0:
            raise BrokerUnavailable(f"topic {topic!r} does not exist (a broker that lost it?)")
        if self._partitions is None or self._partitions.partitions != n:
            self._partitions = KeyPartitions(n)
        return self._partitions

    def swap(self, model: LoadedModel) -> None:
        if model.context + BUFFER_SLACK > self.capacity:
            self.capacity = model.context + BUFFER_SLACK
            self.rebuild()
        self.model = model

    def rebuild(self) -> None:
        """Reload the last windows of every series from the history store."""
        from pipeline.store import HistoryStore

        frame = HistoryStore(self.settings).last_windows(self.capacity)
        self.buffers = ContextBuffers(self.capacity, self.step_ms)
        self.add(frame.to_arrow())
        SERIES.set(len(self.buffers))
        log.info("rebuilt context of %d series from the history store", len(self.buffers))

    def assigned(self, partitions: Iterable[int]) -> None:
        """Windows partitions newly assigned: moved here, or kept through an eager rebalance. Another
        consumer may have read windows of their series meanwhile (which this one's buffers then lack),
        so :meth:`refresh` reloads each series from the history store when it first comes again."""
        for p in partitions:
            self._refreshed[p] = set()

    def refresh(self, tables: Iterable[tuple[int, pa.Table]]) -> None:
        """Merge the store's last windows of the series of ``(partition, windows table)`` pairs not yet
        refreshed since their partition was assigned (one store read). Ingest stores a checkpoint's
        windows before it produces the next one's, so the store holds every window older than these."""
        todo: dict[str, int] = {}
        for p, table in tables:
            done = self._refreshed.get(p)
            if done is not None:
                todo.update((x, p) for x in table.column("series").to_pylist() if x not in done)
        if not todo:
            return
        from pipeline.store import HistoryStore

        self.add(HistoryStore(self.settings).last_windows(self.capacity, series=list(todo)).to_arrow())
        for x, p in todo.items():
            self._refreshed[p].add(x)

    def add(self, table: pa.Table) -> list[tuple[str, int]]:
        """Put windows into the buffers; return their (series, window_end) in arrival order."""
        series, ends, values = target_values(table, self.target)
        self.buffers.put(series, ends, values)
        return list(zip(series, ends.tolist(), strict=True))

    def forecast(self, keys: Iterable[tuple[str, int]], issued_at: int, chunk: int = MESSAGE_CHUNK,
                 batch: Sequence[pa.Table] = ()) -> Iterator[list[tuple[str, bytes]]]:
        """One batched inference over every (series, window_end) with enough context; yields the forecast
        messages ``chunk`` series at a time (the caller sends each while the next is built).

        ``batch``: the windows tables just :meth:`add`-ed. Ingest produces a checkpoint's windows
        before it writes them to the store, so contexts older than the buffer come from the store
        plus these."""
        import models

        t_start = time.perf_counter()
        length = self.model.context
        keys = list(dict.fromkeys(keys))
        if not keys:
            return
        series = [s for s, _ in keys]
        ends = np.fromiter((e for _, e in keys), dtype=np.int64, count=len(keys))
        rows = self.buffers.row_of(series)
        ctx, ok, evicted = self.buffers.contexts(rows, ends, length)
        # Windows older than the buffer (a batch holding more than `capacity` windows of a series:
        # a lagging one after a restart, or gap rows filling a long silence): one store read per series
        # for all of them, not one per window (per-window reads took minutes for a few thousand windows
        # and stalled the job), plus the windows added with this batch.
        older: dict[str, list[int]] = {}
        for i in np.flatnonzero(evicted).tolist():
            older.setdefault(series[i], []).append(i)
        own = _windows_of(batch, older.keys(), self.target) if older else {}
        for s, items in older.items():
            stored = self._buffer_from_store(s, int(ends[items].min()), int(ends[items].max()), length,
                                             own.get(s))
            ctx[items], ok[items], _ = stored.contexts(stored.row_of([s] * len(items)), ends[items], length)
        lead = ok & np.isnan(ctx[:, 0])  # gap rows are forward-filled; a context cannot start with one
        if (~ok).any():
            SKIPPED.labels("short_context").inc(int((~ok).sum()))
        if lead.any():
            SKIPPED.labels("leading_gap").inc(int(lead.sum()))
        use = np.flatnonzero(ok & ~lead)
        if not len(use):
            return
        ok_ends = ends[use]
        grid = ok_ends[:, None] - self.step_ms * np.arange(length - 1, -1, -1)
        contexts = ctx[use]
        t0 = time.perf_counter()
        STAGE_S.labels("context").observe(t0 - t_start)
        preds = models.predict(self.model.module, contexts, window_end_ms=grid)
        t1 = time.perf_counter()
        INFERENCE_S.observe(t1 - t0)
        STAGE_S.labels("inference").observe(t1 - t0)
        names, preds = [series[i] for i in use.tolist()], np.asarray(preds)
        building, t2 = 0.0, time.perf_counter()
        for out in forecast_message_chunks(names, ok_ends, preds, self.model, self.step_ms, issued_at, chunk):
            building += time.perf_counter() - t2
            yield out
            t2 = time.perf_counter()
        STAGE_S.labels("messages").observe(building)

    def _buffer_from_store(self, series: str, first_end: int, last_end: int, length: int,
                           own: tuple[np.ndarray, np.ndarray] | None = None) -> ContextBuffers:
        """The windows of ``series`` that supply the contexts of windows ending in [first_end, last_end]
        (older than the in-memory buffer): those in the history store, then ``own`` (window ends and
        values of the batch's own windows, which the store may not hold yet)."""
        from pipeline.store import HistoryStore

        lo = first_end - length * self.step_ms
        frame = HistoryStore(self.settings).read(series=series, start_ms=lo, end_ms=last_end)
        buf = ContextBuffers((last_end - first_end) // self.step_ms + length + 1, self.step_ms)
        buf.put(*target_values(frame.to_arrow(), self.target))
        if own is not None:
            window_ends, values = own
            mine = (window_ends > lo) & (window_ends <= last_end)  # others would wrap around this buffer
            buf.put([series] * int(mine.sum()), window_ends[mine], values[mine])
        return buf


def _windows_of(tables: Sequence[pa.Table], wanted: Iterable[str],
                target: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{series: (window ends, target values)} of the ``wanted`` series in the windows ``tables``."""
    if not tables:
        return {}
    added = [target_values(table, target) for table in tables]
    frame = pl.DataFrame({
        "series": pl.Series([s for names, _, _ in added for s in names], dtype=pl.String),
        "end": np.concatenate([e for _, e, _ in added]),
        "value": np.concatenate([v for _, _, v in added]),
    }).filter(pl.col("series").is_in(list(wanted)))
    return {s: (part["end"].to_numpy(), part["value"].to_numpy())
            for (s,), part in frame.partition_by("series", as_dict=True).items()}


def target_values(table: pa.Table, target: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Series, window ends and target values of a windows table; NaN where a window is a gap
    (``count = 0``), except for the ``count`` target itself."""
    values = table.column(target).to_numpy(zero_copy_only=False).astype(np.float64)
    if target != "count":
        values = np.where(table.column("count").to_numpy(zero_copy_only=False) > 0, values, np.nan)
    ends = table.column("window_end").to_numpy(zero_copy_only=False).astype(np.int64)
    return table.column("series").to_pylist(), ends, values


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


def keep_freed_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse freed memory for the next inference instead of returning it to the OS.

    Every inference allocates and frees tensors of a few MB. With glibc's defaults those come from
    fresh ``mmap`` regions or a heap top that ``free`` trims back to the OS, so each call faults its
    pages in again: TCN inference for 1,000 series took 28 ms per batch in the job against 12 ms
    with these thresholds (benchmarks/forecast_latency.py, one run each; BENCHMARKS.md). Memory then
    stays at the largest batch's working set instead of shrinking between batches. No-op (False)
    where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def freeze_heap() -> int:
    """Collect garbage once, then exempt every object alive now (imported modules, the model, the buffers)
    from later collections, and make sure the collector is on (``rollcast`` starts with it off, see
    :func:`jobs.cli.collector_off_during_start_up`); return how many objects are exempt.

    The job holds a few hundred thousand long-lived objects (torch, polars, MLflow, the model), and every
    full (generation 2) collection walked all of them: 275 ms in one benchmark run, a stall of one batch
    every time allocations trigger it. After :func:`gc.freeze` a collection walks only objects created
    since. Frozen objects are still freed by reference counting; only cycles among them are kept.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.enable()
    return gc.get_freeze_count()


def run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.config import require_bootstrap
    from pipeline.kafka import ensure_topics
    from pipeline.observability import BrokerProbe, Health, serve_http

    if not keep_freed_heap():
        log.debug("not glibc: malloc thresholds left as they are")
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
    log.debug("%d start-up objects exempt from garbage collection", freeze_heap())
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
    """Run :func:`_serve` until asked to stop; after a Kafka error (or a history store error while reading
    the context of a lagging batch), back off and start a new session.

    The consumer is kept (it rejoins its group by itself; the failed batch was
    rewound, so windows whose forecasts were not acknowledged are read again);
    the producer is new (an idempotent one is refused by a broker that lost
    its producer id) and the topics are created again if the broker lost them.
    The in-memory context is kept: re-reading a window replaces it with the
    same values. One warning per outage; retries log at debug.
    """
    from kafka.errors import KafkaError

    from pipeline.kafka import Backoff, ensure_topics, make_consumer

    consumer = make_consumer(settings, settings.groups.forecast)
    consumer.subscribe([settings.topics.windows], listener=_assignment_log(forecaster))
    backoff, failing = Backoff(), False
    try:
        while not shutdown.requested:
            try:
                if failing:
                    ensure_topics(settings)
                return _serve(settings, args, forecaster, consumer, shutdown, health)
            except (KafkaError, BrokerUnavailable, StoreUnavailable) as e:
                health.facts["last_error"] = f"{type(e).__name__}: {e}"
                if shutdown.requested:
                    log.error("could not finish the last batch (%s); a restart forecasts it again", e)
                    return 1
                if not failing:
                    what = "history store" if isinstance(e, StoreUnavailable) else "Kafka"
                    log.warning("%s error in the forecast loop (%s: %s); retrying the batch with a new "
                                "producer", what, type(e).__name__, e)
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

    from pipeline.kafka import BulkProducer, poll_promptly
    from pipeline.observability import LagTracker

    lag = LagTracker(LAG)
    producer = BulkProducer(settings, **{"compression.type": settings.forecast.compression})
    last_data = time.monotonic()
    clean = False
    try:
        while not shutdown.requested:
            batch = poll_promptly(consumer, 200)
            if batch:
                complete_batch(consumer, batch, settings.forecast.batch_wait_ms / 1000)
            health.polled()
            lag.update(consumer, batch)
            if batch or not consumer.assignment():  # the idle clock runs only while assigned
                last_data = time.monotonic()
            if batch:
                try:
                    process_batch(batch, forecaster, producer, consumer, settings)
                except (KafkaError, BrokerUnavailable, StoreUnavailable):
                    _rewind(consumer, batch)  # not committed: read it again
                    raise
            elif args.exit_when_idle is not None and time.monotonic() - last_data > args.exit_when_idle:
                log.info("no windows for %.1fs; exiting", args.exit_when_idle)
                break
            if forecaster.watcher is not None:
                new = forecaster.watcher.take()
                if new is not None:
                    forecaster.swap(new)
                    freeze_heap()
                    MODEL_VERSION.set(float(new.version) if new.version.isdigit() else -1)
                    health.facts.update(model=new.name, model_version=new.version)
        clean = True
    finally:
        producer.close(settings.observability.shutdown_timeout_s if clean else 1.0)
    return 0


def complete_batch(consumer: Any, batch: dict, wait_s: float) -> None:
    """Add to ``batch`` (a poll's records) what the consumer has fetched since, then the rest of every windows
    batch whose ``rollcast-batch`` headers announce partitions this consumer owns but ``batch`` lacks, for up
    to ``wait_s``. A checkpoint's partitions often land in different fetches; forecasting each fetch on its
    own runs the inference and the messages twice and delays the second half by the first."""

    from pipeline.kafka import poll_promptly

    def extend(more: dict) -> None:
        for tp, records in more.items():
            batch.setdefault(tp, []).extend(records)

    extend(consumer.poll(timeout_ms=0))
    if wait_s <= 0:
        return
    owned = {tp.partition for tp in consumer.assignment()}
    deadline, waited = time.monotonic() + wait_s, False
    while announced_missing(((tp.partition, r) for tp, records in batch.items() for r in records), owned):
        left = deadline - time.monotonic()
        if left <= 0:
            BATCH_WAITS.labels("timeout").inc()
            log.debug("windows batch still incomplete after %.0f ms; forecasting what arrived", wait_s * 1000)
            return
        waited = True
        extend(poll_promptly(consumer, max(1, math.ceil(left * 1000))))
    if waited:
        BATCH_WAITS.labels("complete").inc()


def _assignment_log(forecaster: Forecaster) -> Any:
    """A rebalance listener that logs the partitions the job gains and loses, and tells ``forecaster``
    which it gained (:meth:`Forecaster.assigned`)."""
    from kafka import ConsumerRebalanceListener

    class _AssignmentLog(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            if revoked:
                log.info("revoked partitions %s", sorted(tp.partition for tp in revoked))

        def on_partitions_assigned(self, assigned: Any) -> None:
            if assigned:
                log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
            forecaster.assigned(tp.partition for tp in assigned)

    return _AssignmentLog()


def _rewind(consumer: Any, batch: dict) -> None:
    """Seek every still-assigned partition of ``batch`` back to its first record."""
    assigned = consumer.assignment()
    for tp, records in batch.items():
        if records and tp in assigned:
            consumer.seek(tp, records[0].offset)


def process_batch(batch: dict, forecaster: Forecaster, producer: BulkProducer, consumer: Any,
                  settings: Settings) -> None:
    """Windows of one poll -> forecasts acknowledged by the broker -> offsets committed."""
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
    # librdkafka sends each chunk while the next one's JSON is built
    for messages in forecaster.forecast(keys, issued_at=int(time.time() * 1000), batch=tables):
        t0 = time.perf_counter()
        producer.send(topic, [(key.encode(), value, parts[key]) for key, value in messages])
        sent += len(messages)
        sending += time.perf_counter() - t0
    t0 = time.perf_counter()
    # raises unless the broker acknowledged every message: then offsets stay uncommitted
    producer.confirm(topic, timeout_s=settings.observability.shutdown_timeout_s)
    t2 = time.perf_counter()
    STAGE_S.labels("send").observe(sending + t2 - t0)
    FORECASTS.inc(sent)
    if oldest_ts is not None:
        END_TO_END_S.observe(max(0.0, time.time() - oldest_ts / 1000))
    # bounded: kafka-python retries a commit forever while the coordinator is unknown
    consumer.commit(commits, timeout_ms=int(settings.observability.shutdown_timeout_s * 1000))
    STAGE_S.labels("commit").observe(time.perf_counter() - t2)
