"""Serving the champion: the model in use, the in-memory contexts of every series, and one batched
inference per batch of closed windows (eager PyTorch without a Trainer, or the version's ONNX graph in
ONNX Runtime: ``forecast.runtime``), encoded as
forecast messages. Live scoring is not here: the forecast loop (:mod:`models.serving.session`) hands
the inference to the scorer and the forecasts it issues back to :meth:`Forecaster.messages`.

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

from models.compiled import EAGER
from models.data import known_any
from models.scoring.calibration import CALIBRATION_FILE, HoldoutOffsets
from models.scoring.scorer import Issued, ModelRef
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
    from models.compiled import OnnxModel
    from pipeline.kafka.producer import BulkProducer

log = logging.getLogger("rollcast.forecast")

BUFFER_SLACK = 32  # windows kept beyond L so repeats after a restart still find their context
# forecasts built and handed to the producer at a time: the broker receives (and readers can read) the
# first ones while the rest are built, instead of all of them after the last
MESSAGE_CHUNK = 250


@dataclass
class LoadedModel:
    """A registered version, loaded: the module, its compiled form when it has one that gives the module's
    forecasts (:mod:`models.compiled`; that then serves), and what serving needs of its config."""

    name: str
    version: str
    module: Any
    context: int
    horizon: int
    quantiles: list[float]
    compiled: OnnxModel | None = None
    calibration: HoldoutOffsets | None = None  # its split-conformal offsets from the holdout, when saved

    @property
    def runner(self) -> Any:
        """What :func:`models.predict` runs: the compiled form, else the module (eager PyTorch)."""
        return self.module if self.compiled is None else self.compiled

    @property
    def runtime(self) -> str:
        """``"onnxruntime"`` when the compiled form serves, ``"eager"`` (PyTorch) when the module does."""
        return EAGER if self.compiled is None else self.compiled.runtime

    @property
    def ref(self) -> ModelRef:
        """What forecast and score messages say of it."""
        return ModelRef(self.name, self.version, list(self.quantiles))


@dataclass
class Inference:
    """One batched inference (:meth:`Forecaster.infer`): the (series, window_end) ``keys`` of the batch;
    ``use``, the rows of them forecast, with their series ``names``, window ends ``ok_ends``, contexts
    ``(n, L)`` and the model's quantiles ``preds`` ``(n, H, Q)``; the model, and ``issued_at``."""

    keys: list[tuple[str, int]]
    use: np.ndarray
    names: list[str]
    ok_ends: np.ndarray
    contexts: np.ndarray
    preds: np.ndarray
    model: ModelRef
    issued_at: int

    def unscored(self) -> list[Issued]:
        """Every forecast, as the model made it (scoring off)."""
        return [Issued(np.arange(len(self.use)), self.preds, None, self.model, self.issued_at)]


def load_saved_model(model_dir: Path, version: str, threads: int | None = None, compiled: bool = True) -> LoadedModel:
    """The model saved in ``model_dir``, with its ONNX graph in ONNX Runtime when it has one that gives the
    module's forecasts (else a warning says why, and the module serves in eager PyTorch).

    ``threads``: ONNX Runtime's intra-op threads; None: torch's, which the forecast job sets from
    ``forecast.inference_threads`` before it loads a model. ``compiled=False``: the module serves even
    when there is a graph."""
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
        compiled=models.load_compiled(model_dir, module, threads) if compiled else None,
        calibration=load_holdout_offsets(model_dir),
    )


def load_holdout_offsets(model_dir: Path) -> HoldoutOffsets | None:
    """The holdout offsets saved with a model (:data:`~models.scoring.calibration.CALIBRATION_FILE`), or None
    (a version trained before they were saved, or one whose file cannot be read: a warning says so)."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        return HoldoutOffsets.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as e:
        log.warning("the model's holdout calibration offsets (%s) cannot be read, series start uncalibrated: %s",
                    path, e)
        return None


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

    def infer(self, keys: Iterable[tuple[str, int]], issued_at: int, batch: Sequence[pa.Table] = (),
              always: bool = False) -> Inference | None:
        """One batched inference over every (series, window_end) with enough context; None when there is no
        key, or (unless ``always``: the scorer still settles the batch's windows) none can be forecast.

        ``batch``: the windows tables just :meth:`add`-ed. Ingest produces a checkpoint's windows before it
        writes them to the store, so contexts older than the buffer come from the store plus these."""
        import models

        t_start = time.perf_counter()
        length = self.model.context
        keys = list(dict.fromkeys(keys))
        if not keys:
            return None
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
        if not len(use) and not always:
            return None
        ok_ends = ends[use]
        grid = ok_ends[:, None] - self.step_ms * np.arange(length - 1, -1, -1)
        contexts = ctx[use]
        t0 = time.perf_counter()
        STAGE_S.labels("context").observe(t0 - t_start)
        preds = models.predict(self.model.runner, contexts, window_end_ms=grid) if len(use) \
            else np.zeros((0, self.model.horizon, len(self.model.quantiles)), dtype=np.float32)
        t1 = time.perf_counter()
        INFERENCE_S.observe(t1 - t0)
        STAGE_S.labels("inference").observe(t1 - t0)
        return Inference(keys, use, [series[i] for i in use.tolist()], ok_ends, contexts, np.asarray(preds),
                         self.model.ref, issued_at)

    def messages(self, inference: Inference, issued: Sequence[Issued] | None = None,
                 chunk: int = MESSAGE_CHUNK) -> Iterator[list[tuple[str, bytes]]]:
        """The forecast messages of ``inference``, ``chunk`` series at a time (the caller sends each while
        the next is built): as ``issued`` by the scorer (served quantiles, repeats as first served), else
        the model's own quantiles."""
        building, t2 = 0.0, time.perf_counter()
        for g in inference.unscored() if issued is None else issued:
            for out in forecast_message_chunks([inference.names[i] for i in g.index.tolist()],
                                               inference.ok_ends[g.index], g.served, g.model, self.step_ms,
                                               g.issued_at, chunk, model_preds=g.model_q):
                building += time.perf_counter() - t2
                yield out
                t2 = time.perf_counter()
        STAGE_S.labels("messages").observe(building)
