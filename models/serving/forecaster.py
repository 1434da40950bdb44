"""Serving the champion: the model in use, the in-memory contexts of every series, and one batched
inference per batch of closed windows in plain PyTorch (no Trainer in the hot path), encoded as
forecast messages.

:class:`Forecaster` is what the forecast job holds between batches; :func:`load_saved_model` loads a
version (weights plus JSON config, nothing unpickled) into a :class:`LoadedModel`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from models.data import fill_gaps, known_any
from models.scoring.scorer import Emitted, ModelRef, ScoredBatch, Scorer, seasonal_naive
from models.serving.telemetry import INFERENCE_S, SERIES, SKIPPED, STAGE_S
from pipeline.config import Settings
from pipeline.contexts import (
    ContextBuffers,
    buffer_from_store,
    contexts_from_store,
    target_values,
    windows_of,
)
from pipeline.errors import BrokerUnavailable
from pipeline.forecasts_io import forecast_message_chunks
from pipeline.store import HistoryStore
from pipeline.windows_io import KeyPartitions

if TYPE_CHECKING:
    from pipeline.kafka.producer import BulkProducer

log = logging.getLogger("rollcast.forecast")

BUFFER_SLACK = 32  # windows kept beyond L so repeats after a restart still find their context
# forecasts built and handed to the producer at a time: the broker receives (and readers can read) the
# first ones while the rest are built, instead of all of them after the last
MESSAGE_CHUNK = 250


@dataclass
class LoadedModel:
    """A registered version, loaded: the module and what serving needs of its config."""

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


def _ref(model: LoadedModel) -> ModelRef:
    return ModelRef(model.name, model.version, list(model.quantiles))


class Forecaster:
    """In-memory context of every series plus the model serving them."""

    def __init__(self, settings: Settings, model: LoadedModel):
        self.settings = settings
        self.model = model
        self.step_ms = settings.window.length_ms
        self.target = settings.window.target
        self.capacity = max(settings.model.context, model.context) + BUFFER_SLACK
        self.buffers = ContextBuffers(self.capacity, self.step_ms)
        self._partitions: KeyPartitions | None = None
        # windows partition -> series refreshed from the store since the partition was last assigned
        self._refreshed: dict[int, set[str]] = {}
        # live scoring and online calibration (models.scoring.scorer); the score messages of the last forecast()
        self.scorer = Scorer(settings, _ref(model), model.horizon, self.step_ms) if settings.scoring.enabled \
            else None
        self.scored: Emitted | None = None

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
        if self.scorer is not None:
            if self.scorer.compatible(_ref(model), model.horizon):
                self.scorer.serve(_ref(model))
            else:
                log.warning("version %s forecasts another horizon or other quantiles: forecasts of the previous "
                            "version still pending are not scored, and calibration starts afresh", model.version)
                self.scorer = Scorer(self.settings, _ref(model), model.horizon, self.step_ms)

    def rebuild(self) -> None:
        """Reload the last windows of every series from the history store."""
        self.buffers = contexts_from_store(HistoryStore(self.settings), self.capacity, self.step_ms, self.target)
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
        self.add(HistoryStore(self.settings).last_windows(self.capacity, series=list(todo)).to_arrow())
        for x, p in todo.items():
            self._refreshed[p].add(x)

    def add(self, table: pa.Table) -> list[tuple[str, int]]:
        """Put windows into the buffers; return their (series, window_end) in arrival order."""
        series, ends, values = target_values(table, self.target)
        self.buffers.put(series, ends, values)
        return list(zip(series, ends.tolist(), strict=True))

    def forecast(self, keys: Iterable[tuple[str, int]], issued_at: int, chunk: int = MESSAGE_CHUNK,
                 batch: Sequence[pa.Table] = (), partitions: Sequence[int] | None = None,
                 ) -> Iterator[list[tuple[str, bytes]]]:
        """One batched inference over every (series, window_end) with enough context; yields the forecast
        messages ``chunk`` series at a time (the caller sends each while the next is built).

        ``batch``: the windows tables just :meth:`add`-ed (and ``partitions``, the windows partition of
        each). Ingest produces a checkpoint's windows before it writes them to the store, so contexts
        older than the buffer come from the store plus these. With scoring on, they also settle earlier
        forecasts: :attr:`scored` then holds the forecasts this call scored (their messages are built
        when the caller asks, after sending the forecasts)."""
        import models

        t_start = time.perf_counter()
        self.scored = None
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
        # for all of them, not one per window (per-window reads of a few thousand windows stalled the
        # job for minutes), plus the windows added with this batch.
        older: dict[str, list[int]] = {}
        for i in np.flatnonzero(evicted).tolist():
            older.setdefault(series[i], []).append(i)
        own = windows_of(batch, older.keys(), self.target) if older else {}
        store = HistoryStore(self.settings) if older else None
        for s, items in older.items():
            stored = buffer_from_store(store, s, int(ends[items].min()), int(ends[items].max()), length,
                                       self.step_ms, self.target, own.get(s))
            ctx[items], ok[items], _ = stored.contexts(stored.row_of([s] * len(items)), ends[items], length)
        unknown = ok & ~known_any(ctx)  # only gaps: not forecast (the gap rule, models.data.fill_gaps)
        if (~ok).any():
            SKIPPED.labels("short_context").inc(int((~ok).sum()))
        if unknown.any():
            SKIPPED.labels("no_known_value").inc(int(unknown.sum()))
        use = np.flatnonzero(ok & ~unknown)
        if not len(use) and self.scorer is None:
            return
        ok_ends = ends[use]
        grid = ok_ends[:, None] - self.step_ms * np.arange(length - 1, -1, -1)
        contexts = ctx[use]
        t0 = time.perf_counter()
        STAGE_S.labels("context").observe(t0 - t_start)
        preds = models.predict(self.model.module, contexts, window_end_ms=grid) if len(use) \
            else np.zeros((0, self.model.horizon, len(self.model.quantiles)), dtype=np.float32)
        t1 = time.perf_counter()
        INFERENCE_S.observe(t1 - t0)
        STAGE_S.labels("inference").observe(t1 - t0)
        names, preds = [series[i] for i in use.tolist()], np.asarray(preds)
        if self.scorer is None:
            groups = [(np.arange(len(use)), preds, None, _ref(self.model), issued_at)]
        else:
            scored = self._score(keys, use, contexts, preds, issued_at, batch, partitions)
            self.scored = scored.emitted
            if scored.repeats_not_held:
                SKIPPED.labels("repeat_sent_before").inc(scored.repeats_not_held)
            model_q = (lambda x: x) if self.scorer.calibrate else (lambda x: None)
            groups = [(g.index, g.served, model_q(g.model_q), g.model, g.issued_at) for g in scored.issued]
            STAGE_S.labels("scoring").observe(time.perf_counter() - t1)
        building, t2 = 0.0, time.perf_counter()
        for index, served, model_preds, ref, at in groups:
            for out in forecast_message_chunks([names[i] for i in index.tolist()], ok_ends[index], served, ref,
                                               self.step_ms, at, chunk, model_preds=model_preds):
                building += time.perf_counter() - t2
                yield out
                t2 = time.perf_counter()
        STAGE_S.labels("messages").observe(building)

    def _score(self, keys: list[tuple[str, int]], use: np.ndarray, contexts: np.ndarray, preds: np.ndarray,
               issued_at: int, batch: Sequence[pa.Table], partitions: Sequence[int] | None) -> ScoredBatch:
        """Hand every window of the batch, in arrival order, and the forecasts of ``use`` to the scorer."""
        assert self.scorer is not None
        names: list[str] = []
        ends, values, parts = [], [], []
        for k, table in enumerate(batch):
            s, e, v = target_values(table, self.target)
            names.extend(s)
            ends.append(e)
            values.append(v)
            parts.append(np.full(len(s), -1 if partitions is None else partitions[k], dtype=np.int32))
        first: dict[tuple[str, int], int] = {}
        for i, key in enumerate(zip(names, np.concatenate(ends).tolist() if ends else [], strict=True)):
            first.setdefault(key, i)
        extra = [key for key in keys if key not in first]  # forecast without its window in `batch` (tests)
        for key in extra:
            first[key] = len(names)
            names.append(key[0])
        ends.append(np.array([e for _, e in extra], dtype=np.int64))
        values.append(np.full(len(extra), np.nan))
        parts.append(np.full(len(extra), -1, dtype=np.int32))
        fc_window = np.array([first[keys[i]] for i in use.tolist()], dtype=np.int64)
        naive = seasonal_naive(fill_gaps(contexts), self.model.horizon, self.settings.model.season) \
            if len(use) else np.zeros((0, self.model.horizon))
        return self.scorer.run(names, np.concatenate(ends), np.concatenate(values), np.concatenate(parts),
                               fc_window, preds, naive, issued_at)
