"""Live scoring in the forecast job: every forecast is kept until the windows it covered have closed, then
scored against them (and against seasonal naive from the same origin), and the served quantiles are
calibrated online from the same residuals (:mod:`models.scoring.calibration`).

The path of one score: the forecast loop (:func:`models.serving.session.process_batch`) hands each
windows batch and its inference to :meth:`Scorer.score_batch`; the scorer computes each settled
forecast's errors (:func:`point_errors`) and builds its message (:mod:`pipeline.scores_io`'s format),
which the loop sends to the scores topic.

Why in the forecast job and not a job of its own: the forecast job already receives every window that
settles a forecast (the windows topic, partitioned by series) and holds the contexts the seasonal-naive
forecast needs, and the calibration must feed back into the quantiles it serves. A separate job would
join two topics and send the calibration back through a third.

State, per series (one row), bounded by the horizon H:

- a ring of the last H forecasts issued (slot ``(last_window_end // step) % H``): the served and the
  model's own quantiles ``(H, Q)``, the seasonal-naive forecast ``(H,)``, the actuals seen so far, the
  model version and ``issued_at``;
- the :class:`~models.scoring.calibration.QuantileTracker` state ``(H, Q)`` (experts, weights, guard), started
  from the model version's holdout offsets;
- the end of the last window processed.

Each window of a series, in order: first it settles step ``h`` of the forecast issued ``h`` windows
before it (its actual is recorded and, for forecasts of the current model, the calibration is
updated); a forecast whose last step is settled (or passed) becomes one score message; then the
window's own forecast is calibrated and put in the ring. A window at or before the last one processed
is a repeat (ingest may produce a window again after a crash): its forecast is re-sent exactly as
first served, from the ring, and nothing is settled again. So the scores and the calibration depend
only on each series' sequence of windows, not on how they were batched.

Exactly-once across crashes: :meth:`Scorer.save` writes the state of a windows partition's series,
with the offset it covers, to the history store (the forecast job does this every
``scoring.checkpoint_s`` and then commits that offset); on assignment the job loads it and seeks to
that offset. A restart after a ``kill -9`` redoes the windows after the last save from the same state,
so the forecasts and scores it publishes again carry the same values (a forecast re-done after a crash
gets a new ``issued_at``, as before), and none is missing.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from models.base import seasonal_naive_index
from models.data import fill_gaps
from models.scoring.accuracy import LiveTotals
from models.scoring.anomaly import outside, tail_probability
from models.scoring.calibration import HoldoutOffsets, QuantileTracker
from pipeline.anomalies_io import anomaly_messages
from pipeline.config import Settings
from pipeline.contexts import target_values
from pipeline.quantiles import interval_indices, level_indices
from pipeline.scores_io import decode_score, score_messages

log = logging.getLogger("rollcast.forecast")

STATE_FORMAT = 2  # 1: one offset per (step, quantile), read as the start of every expert


@dataclass(frozen=True)
class ModelRef:
    """What a forecast or score message says of the model that made it."""

    name: str
    version: str
    quantiles: list[float]


@dataclass
class Issued:
    """Forecasts to send for one batch: rows ``index`` of the caller's forecast rows, with their served
    and model quantiles ``(n, H, Q)`` (``model_q`` None: the served ones are the model's own), model, and
    ``issued_at``, one for all or one per row (a repeat keeps its first one)."""

    index: np.ndarray
    served: np.ndarray
    model_q: np.ndarray | None
    model: ModelRef
    issued_at: np.ndarray | int


class Forecasts(Protocol):
    """What :meth:`Scorer.score_batch` needs of one batched inference
    (:class:`models.serving.forecaster.Inference`): the (series, window_end) forecast for, the rows of
    them with a forecast, their contexts ``(n, L)`` and the model's quantiles ``(n, H, Q)``."""

    keys: list[tuple[str, int]]
    use: np.ndarray
    contexts: np.ndarray
    preds: np.ndarray
    issued_at: int


@dataclass
class PointErrors:
    """The errors of ``n`` scored forecasts at each of their ``H`` steps, ``(n, H)`` arrays (``pinball``
    ``(n, H, Q)``) named as the decoded score message's columns (:mod:`pipeline.scores_io`: the message
    carries ``model_inside``, and :func:`~pipeline.scores_io.decode_score` derives the others from the
    values it carries, in the same way). A step is scored when ``known`` (its window had data:
    ``actual`` finite); at other steps the errors mean nothing (NaN, or False)."""

    known: np.ndarray
    actual: np.ndarray
    forecast: np.ndarray  # the served median
    abs_error: np.ndarray
    sq_error: np.ndarray
    pinball: np.ndarray  # of each served quantile
    inside: np.ndarray  # within the served interval (pipeline.quantiles: q0.1-q0.9)
    model_inside: np.ndarray  # within the model's own
    naive: np.ndarray  # seasonal naive's forecast from the same origin
    naive_abs_error: np.ndarray

    def totals(self) -> list[LiveTotals]:
        """The :class:`~models.scoring.accuracy.LiveTotals` of each forecast (as
        :func:`~models.scoring.accuracy.totals_of` of its message)."""
        known = self.known
        naive_err = np.where(known & np.isfinite(self.naive_abs_error), self.naive_abs_error, 0.0)
        sums = [known.sum(1), np.where(known, self.abs_error, 0.0).sum(1), np.where(known, self.sq_error, 0.0).sum(1),
                naive_err.sum(1), (known & self.inside).sum(1), (known & self.model_inside).sum(1)]
        return [LiveTotals(int(p), float(e), float(s), float(ne), int(i), int(mi))
                for p, e, s, ne, i, mi in zip(*(x.tolist() for x in sums), strict=True)]


def point_errors(actual: np.ndarray, served: np.ndarray, model_q: np.ndarray, naive: np.ndarray,
                 quantiles: list[float]) -> PointErrors:
    """The errors of ``n`` forecasts: their ``actual`` ``(n, H)`` (NaN: a gap window), ``served`` and
    ``model_q`` quantiles ``(n, H, Q)`` and seasonal-naive forecasts ``naive`` ``(n, H)``."""
    q = np.asarray(quantiles, dtype=np.float64)
    actual = actual.astype(np.float64)
    served = served.astype(np.float64)
    naive = np.asarray(naive, dtype=np.float64)
    point = served[..., list(quantiles).index(0.5)]
    lo, hi = interval_indices(quantiles)
    diff = actual - point
    err = actual[..., None] - served
    return PointErrors(
        known=np.isfinite(actual), actual=actual, forecast=point, abs_error=np.abs(diff), sq_error=diff * diff,
        pinball=np.maximum(q * err, (q - 1) * err),
        inside=(served[..., lo] <= actual) & (actual <= served[..., hi]),
        model_inside=(model_q[..., lo] <= actual) & (actual <= model_q[..., hi]),
        naive=naive, naive_abs_error=np.abs(actual - naive))


def score_totals(actual: np.ndarray, served: np.ndarray, model_q: np.ndarray, naive: np.ndarray,
                 quantiles: list[float]) -> list[LiveTotals]:
    """The :class:`~models.scoring.accuracy.LiveTotals` of each of ``n`` forecasts (as
    :func:`~models.scoring.accuracy.totals_of` of their messages)."""
    return point_errors(actual, served, model_q, naive, quantiles).totals()


class Emitted:
    """The forecasts scored in one batch, as arrays; their errors are computed once
    (:func:`point_errors`), when the messages or the sums are first asked for
    (after the batch's forecasts are on their way)."""

    def __init__(self, scorer: Scorer):
        self.models = [(m.name, m.version) for m in scorer.models]
        self.step, self.calibrated, self.quantiles = scorer.step, scorer.calibrate, scorer.quantiles
        self.anomaly_level = scorer.anomaly_level
        self._parts: list[dict[str, Any]] = []
        self._anomalies: list[dict[str, Any]] = []
        self._errors: PointErrors | None = None

    def add(self, **arrays: Any) -> None:
        self._parts.append(arrays)
        self._errors = None

    def add_anomalies(self, **arrays: Any) -> None:
        self._anomalies.append(arrays)

    def __len__(self) -> int:
        """Scored forecasts (score messages)."""
        return sum(len(p["names"]) for p in self._parts)

    def __bool__(self) -> bool:
        """Anything to send: scores or anomalies."""
        return bool(self._parts or self._anomalies)

    @property
    def anomaly_count(self) -> int:
        return sum(len(p["names"]) for p in self._anomalies)

    def anomaly_messages(self) -> list[tuple[str, bytes]]:
        """``(series, JSON bytes)`` per anomaly flagged in the batch (:mod:`pipeline.anomalies_io`)."""
        if not self._anomalies:
            return []
        j = _concat(self._anomalies)
        return anomaly_messages(j["names"], j["ts"], j["actual"], j["forecast"], j["lower"], j["upper"], j["tail"],
                                float(self.anomaly_level), self.models, j["model_index"], j["issued_at"], self.step)

    def _joined(self) -> dict[str, Any]:
        if len(self._parts) > 1:
            self._parts = [_concat(self._parts)]
        return self._parts[0]

    def _point_errors(self) -> PointErrors:
        if self._errors is None:
            j = self._joined()
            self._errors = point_errors(j["actual"], j["served"], j["model_q"], j["naive"], self.quantiles)
        return self._errors

    def messages(self) -> list[tuple[str, bytes]]:
        """``(series, JSON bytes)`` per scored forecast (pipeline.scores_io's format): the values as the
        scorer holds them (float32) and where each actual fell in the model's own interval."""
        if not self._parts:
            return []
        j = self._joined()
        return score_messages(j["names"], j["origins"], self.models, j["model_index"], j["issued_at"], self.step,
                              self.calibrated, self.quantiles, actual=j["actual"], served=j["served"],
                              naive=j["naive"], model_inside=self._point_errors().model_inside)

    def totals(self) -> list[tuple[str, int, LiveTotals]]:
        """(model version, last_window_end, sums) per scored forecast, for the live metrics."""
        if not self._parts:
            return []
        j = self._joined()
        return [(self.models[m][1], int(o), t)
                for m, o, t in zip(j["model_index"].tolist(), j["origins"].tolist(), self._point_errors().totals(),
                                   strict=True)]

    @property
    def scores(self) -> list[dict[str, Any]]:
        """The messages, decoded (:func:`pipeline.scores_io.decode_score`; for tests and tools)."""
        decoded = [decode_score(v) for _, v in self.messages()]
        if None in decoded:
            raise ValueError("pipeline.scores_io built a score message its decode_score rejects (a bug)")
        return [m for m in decoded if m is not None]


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Parts of :class:`Emitted` (``names`` a list, the rest arrays) as one."""
    return {k: ([x for p in parts for x in p[k]] if k == "names" else np.concatenate([p[k] for p in parts]))
            for k in parts[0]}


@dataclass
class ScoredBatch:
    emitted: Emitted
    issued: list[Issued] = field(default_factory=list)
    repeats_not_held: int = 0  # repeats older than the ring: already sent, not sent again

    @property
    def scores(self) -> list[dict[str, Any]]:
        return self.emitted.scores

    def forecasts(self) -> list[Issued]:
        """:attr:`issued` as the forecast messages carry it: the model's own quantiles beside the served
        ones only when these are calibrated."""
        if self.emitted.calibrated:
            return self.issued
        return [replace(g, model_q=None) for g in self.issued]


def seasonal_naive(filled: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """Seasonal-naive forecasts ``(B, H)`` from gap-filled contexts ``(B, L)``: step h takes the value a
    whole number of seasons (``m = min(season, L)``) before it (:func:`models.base.seasonal_naive_index`)."""
    return filled[:, seasonal_naive_index(filled.shape[1], horizon, season)]


class Scorer:
    """Pending forecasts, their settlement and the online calibration of every series (module docstring)."""

    def __init__(self, settings: Settings, model: ModelRef, horizon: int, step_ms: int,
                 prior: HoldoutOffsets | None = None):
        self.settings = settings
        self.calibrate = settings.calibration.enabled
        self.quantiles = list(model.quantiles)
        self.q = np.asarray(self.quantiles, dtype=np.float64)
        self.median = self.quantiles.index(0.5)
        self.horizon = int(horizon)
        self.step = int(step_ms)
        self.models: list[ModelRef] = [model]
        self.current = 0  # index into self.models of the serving model
        self.rows: dict[str, int] = {}
        self.names: list[str] = []
        self.tracker = QuantileTracker(self.quantiles, self.horizon, prior=self._prior(prior),
                                       **settings.calibration.tracker_options())
        # anomalies: settled actuals outside the served anomalies.level interval (models.scoring.anomaly)
        pair = level_indices(self.quantiles, settings.anomalies.level) if settings.anomalies.enabled else None
        self.anomaly_level = settings.anomalies.level if pair is not None else None
        self.anomaly_pair = pair
        h, q = self.horizon, len(self.quantiles)
        self._shapes = {"issued": ((h,), np.int64, -1), "emitted": ((h,), np.bool_, True),
                        "issued_at": ((h,), np.int64, 0), "model": ((h,), np.int32, 0),
                        "served": ((h, h, q), np.float32, np.nan), "model_q": ((h, h, q), np.float32, np.nan),
                        "naive": ((h, h), np.float32, np.nan), "actual": ((h, h), np.float32, np.nan),
                        "last_end": ((), np.int64, -1), "partition": ((), np.int32, -1)}
        self.a: dict[str, np.ndarray] = {k: np.full((0, *s), fill, dtype=t)
                                         for k, (s, t, fill) in self._shapes.items()}

    # ------------------------------------------------------------------ model swaps

    def compatible(self, model: ModelRef, horizon: int) -> bool:
        return list(model.quantiles) == self.quantiles and int(horizon) == self.horizon

    def _prior(self, prior: HoldoutOffsets | None) -> HoldoutOffsets | None:
        """The holdout offsets series without live state start from (``calibration.start``), when they fit."""
        if prior is None or self.settings.calibration.start != "holdout":
            return None
        if list(prior.quantiles) != self.quantiles or prior.horizon != self.horizon:
            log.warning("the model's holdout offsets are of other quantiles or another horizon: not used")
            return None
        return prior

    def serve(self, model: ModelRef, prior: HoldoutOffsets | None = None) -> None:
        """A new champion (same quantiles and horizon) with its holdout offsets ``prior``: later forecasts are
        its; only they update the calibration from now on; ``calibration.on_new_champion`` says whether every
        series starts again from ``prior`` (reset) or keeps its offsets (keep; new series start from
        ``prior``)."""
        self.current = self._model_index(model)
        self.tracker.set_prior(self._prior(prior))
        if self.settings.calibration.on_new_champion == "reset":
            self.tracker.reset(np.arange(len(self.names)), self.names)

    def _model_index(self, model: ModelRef) -> int:
        for i, m in enumerate(self.models):
            if m.name == model.name and m.version == model.version:
                return i
        self.models.append(model)
        return len(self.models) - 1

    # ------------------------------------------------------------------ rows

    def _rows(self, series: Sequence[str]) -> np.ndarray:
        """The row of each of ``series``; a series seen for the first time gets one, its calibration started
        from the model's holdout offsets (:meth:`QuantileTracker.reset`)."""
        rows = self.rows
        out = np.empty(len(series), dtype=np.int64)
        first = len(self.names)
        for i, s in enumerate(series):
            r = rows.get(s)
            if r is None:
                r = rows[s] = len(self.names)
                self.names.append(s)
            out[i] = r
        need = len(self.names)
        have = len(self.a["last_end"])
        if need > have:
            extra = max(need, 2 * have, 64) - have
            for k, (s, t, fill) in self._shapes.items():
                self.a[k] = np.concatenate([self.a[k], np.full((extra, *s), fill, dtype=t)])
            self.tracker.grow(have + extra)
        if need > first:
            self.tracker.reset(np.arange(first, need), self.names[first:])
        return out

    # ------------------------------------------------------------------ one batch

    def score_batch(self, inference: Forecasts, batch: Sequence[pa.Table], partitions: Sequence[int] | None,
                    target: str, season: int) -> ScoredBatch:
        """:meth:`run` for a windows batch: every window of ``batch`` (windows tables; ``partitions``, the
        windows partition of each), in arrival order, with its ``target`` value, and the forecasts of
        ``inference`` with the seasonal-naive forecasts (``season``) of their gap-filled contexts."""
        keys, use = inference.keys, inference.use
        names: list[str] = []
        ends, values, parts = [], [], []
        for k, table in enumerate(batch):
            s, e, v = target_values(table, target)
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
        naive = seasonal_naive(fill_gaps(inference.contexts), self.horizon, season) \
            if len(use) else np.zeros((0, self.horizon))
        return self.run(names, np.concatenate(ends), np.concatenate(values), np.concatenate(parts),
                        fc_window, inference.preds, naive, inference.issued_at)

    def run(self, series: Sequence[str], ends: np.ndarray, values: np.ndarray, partitions: np.ndarray,
            fc_window: np.ndarray, preds: np.ndarray, naive: np.ndarray, issued_at: int) -> ScoredBatch:
        """Settle, score and issue for a batch.

        ``series, ends, values, partitions``: every window of the batch in arrival order (values NaN for
        gaps). ``fc_window``: for each forecast row of ``preds`` ``(n, H, Q)`` (the model's quantiles) and
        ``naive`` ``(n, H)``, the index of its window in those arrays. Returns the forecasts to send
        (their served quantiles) and the score messages."""
        out = ScoredBatch(Emitted(self))
        n = len(series)
        if n == 0:
            return out
        ends = np.asarray(ends, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        rows = self._rows(series)
        self.a["partition"][rows] = np.asarray(partitions, dtype=np.int32)
        fc_of = np.full(n, -1, dtype=np.int64)
        fc_of[np.asarray(fc_window, dtype=np.int64)] = np.arange(len(fc_window))
        # rounds: the k-th window of each series in this batch goes in round k (series are unique in a round)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        first = np.r_[True, sorted_rows[1:] != sorted_rows[:-1]]
        starts = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        occurrence = np.empty(n, dtype=np.int64)
        occurrence[order] = np.arange(n) - starts
        preds = np.asarray(preds, dtype=np.float32)
        fresh_rows: list[np.ndarray] = []  # forecast rows issued in each round, and their served quantiles
        fresh_served: list[np.ndarray] = []
        repeats: list[tuple[int, int, int]] = []  # (forecast row, series row, slot)
        for k in range(int(occurrence.max()) + 1):
            idx = np.flatnonzero(occurrence == k)
            r, e = rows[idx], ends[idx]
            fresh = e > self.a["last_end"][r]
            fi = idx[fresh]
            if len(fi):
                self._settle(rows[fi], ends[fi], values[fi], out.emitted)
                self.a["last_end"][rows[fi]] = ends[fi]
                with_fc = fi[fc_of[fi] >= 0]
                if len(with_fc):
                    j = fc_of[with_fc]
                    fresh_rows.append(j)
                    fresh_served.append(self._issue(rows[with_fc], ends[with_fc], preds[j], naive[j], issued_at))
            for i in idx[~fresh].tolist():
                if fc_of[i] < 0:
                    continue
                slot = int((ends[i] // self.step) % self.horizon)
                if self.a["issued"][rows[i], slot] == ends[i]:
                    repeats.append((int(fc_of[i]), int(rows[i]), slot))
                else:
                    out.repeats_not_held += 1
        if fresh_rows:  # a window is in one round only: each forecast row is issued once
            j = np.concatenate(fresh_rows)
            out.issued.append(Issued(j, np.concatenate(fresh_served), preds[j], self.models[self.current],
                                     np.full(len(j), int(issued_at), np.int64)))
        by_model: dict[int, list[tuple[int, int, int]]] = {}
        for item in repeats:
            by_model.setdefault(int(self.a["model"][item[1], item[2]]), []).append(item)
        for m, items in by_model.items():
            j = np.array([x[0] for x in items], dtype=np.int64)
            rr = np.array([x[1] for x in items], dtype=np.int64)
            ss = np.array([x[2] for x in items], dtype=np.int64)
            out.issued.append(Issued(j, self.a["served"][rr, ss], self.a["model_q"][rr, ss], self.models[m],
                                     self.a["issued_at"][rr, ss]))
        return out

    def _settle(self, rows: np.ndarray, ends: np.ndarray, values: np.ndarray, scores: Emitted) -> None:
        """Record the actuals of windows ``ends`` (one per row; ``rows`` are distinct), update the calibration,
        emit every forecast of these rows whose last step is now settled or passed."""
        a, H, step = self.a, self.horizon, self.step
        # window e settles step h of the forecast issued at e - h * step, which sits in that origin's slot:
        # all H steps of every row at once, (n, H); a row's H origins fill H distinct slots
        origin = ends[:, None] - step * np.arange(1, H + 1)
        slot = (origin // step) % H
        hit = (a["issued"][rows[:, None], slot] == origin) & ~a["emitted"][rows[:, None], slot]
        if hit.any():
            i, h = np.nonzero(hit)
            r, s = rows[i], slot[i, h]
            a["actual"][r, s, h] = values[i]
            if self.anomaly_pair is not None:
                self._flag(r[h == 0], s[h == 0], values[i[h == 0]], scores)
            if self.calibrate:
                own = a["model"][r, s] == self.current
                if own.any():
                    r, s, h = r[own], s[own], h[own]
                    self.tracker.update(r, h, a["model_q"][r, s, h], a["served"][r, s, h], values[i[own]])
        done = (a["issued"][rows] >= 0) & ~a["emitted"][rows] & (a["issued"][rows] + H * step <= ends[:, None])
        if done.any():
            rr, ss = np.nonzero(done)
            self._emit(rows[rr], ss, scores)

    def _flag(self, rows: np.ndarray, slots: np.ndarray, actual: np.ndarray, scores: Emitted) -> None:
        """Anomalies among the actuals settling step 1 of the forecasts in (row, slot): those outside the
        served anomaly interval, with their tail probability (:mod:`models.scoring.anomaly`)."""
        if not len(rows):
            return
        served = self.a["served"][rows, slots, 0].astype(np.float64)  # (n, Q): step 1 of each forecast
        out = outside(served, self.anomaly_pair, actual)
        if not out.any():
            return
        rows, slots, actual, served = rows[out], slots[out], np.asarray(actual, dtype=np.float64)[out], served[out]
        lo, hi = self.anomaly_pair
        scores.add_anomalies(names=[self.names[r] for r in rows.tolist()], ts=self.a["issued"][rows, slots],
                             actual=actual, forecast=served[:, self.median], lower=served[:, lo], upper=served[:, hi],
                             tail=tail_probability(served, self.quantiles, actual),
                             model_index=self.a["model"][rows, slots], issued_at=self.a["issued_at"][rows, slots])

    def _issue(self, rows: np.ndarray, ends: np.ndarray, preds: np.ndarray, naive: np.ndarray,
               issued_at: int) -> np.ndarray:
        """Put forecasts in the ring; return their served quantiles (float32)."""
        a = self.a
        served = (self.tracker.apply(rows, preds) if self.calibrate else preds).astype(np.float32)
        slot = (ends // self.step) % self.horizon
        a["issued"][rows, slot] = ends
        a["emitted"][rows, slot] = False
        a["issued_at"][rows, slot] = int(issued_at)
        a["model"][rows, slot] = self.current
        a["served"][rows, slot] = served
        a["model_q"][rows, slot] = preds
        a["naive"][rows, slot] = naive
        a["actual"][rows, slot] = np.nan
        return served

    def _emit(self, rows: np.ndarray, slots: np.ndarray, scores: Emitted) -> None:
        """Score the forecasts in (row, slot) (a copy: the slot may take a new forecast at once); marks them
        emitted."""
        a = self.a
        a["emitted"][rows, slots] = True
        scores.add(names=[self.names[r] for r in rows.tolist()], origins=a["issued"][rows, slots],
                   model_index=a["model"][rows, slots], issued_at=a["issued_at"][rows, slots],
                   actual=a["actual"][rows, slots], served=a["served"][rows, slots],
                   model_q=a["model_q"][rows, slots], naive=a["naive"][rows, slots])

    # ------------------------------------------------------------------ persistence per partition

    def save(self, partition: int, offset: int) -> bytes:
        """The state of ``partition``'s series, covering its windows before ``offset``, as bytes."""
        return self.snapshot(partition, offset)()

    def snapshot(self, partition: int, offset: int) -> Callable[[], bytes]:
        """:meth:`save`'s bytes of the state as it is now, made later by the function returned (the forecast
        job serializes and writes them off its loop): this copies the partition's rows, the function encodes
        the copy."""
        rows = np.flatnonzero(self.a["partition"][: len(self.names)] == partition)
        meta = {"format": STATE_FORMAT, "offset": int(offset), "horizon": self.horizon, "step_ms": self.step,
                "quantiles": self.quantiles, "current": self.current,
                "models": [[m.name, m.version] for m in self.models],
                "series": [self.names[r] for r in rows.tolist()]}
        arrays = {k: v[rows] for k, v in self.a.items()}  # copies (fancy indexing)
        arrays.update(self.tracker.state(rows))

        def encode() -> bytes:
            buf = io.BytesIO()
            np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
            return buf.getvalue()

        return encode

    def load(self, partition: int, data: bytes) -> int | None:
        """Replace ``partition``'s series by a saved state; return its offset, or None (and keep nothing of
        the partition) when the state is of another horizon, step or set of quantiles."""
        self.drop(partition)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") not in (1, STATE_FORMAT) or meta["horizon"] != self.horizon \
                    or meta["step_ms"] != self.step or meta["quantiles"] != self.quantiles:
                log.warning("scoring state of windows partition %d is of another horizon, window or quantiles: "
                            "starting it afresh", partition)
                return None
            remap = np.array([self._model_index(ModelRef(n, v, self.quantiles)) for n, v in meta["models"]]
                             or [0], dtype=np.int32)
            if not meta["series"]:
                return int(meta["offset"])
            rows = self._rows(meta["series"])
            for k in self.a:
                self.a[k][rows] = z[k]
            self.a["model"][rows] = remap[z["model"]]
            self.a["partition"][rows] = partition
            if meta["format"] == 1:  # one offset per (step, quantile), before the experts
                self.tracker.load_offsets(rows, z["offsets"], z["updates"])
            elif not self.tracker.load_state(rows, z):
                log.warning("calibration state of windows partition %d is of other expert steps: its series "
                            "start from the model's holdout offsets", partition)
                self.tracker.reset(rows, meta["series"])
        return int(meta["offset"])

    def drop(self, partition: int) -> None:
        """Forget the pending forecasts and calibration of ``partition``'s series (it moved away)."""
        rows = np.flatnonzero(self.a["partition"][: len(self.names)] == partition)
        if not len(rows):
            return
        for k, (_, _, fill) in self._shapes.items():
            self.a[k][rows] = fill
        self.tracker.reset(rows, [self.names[r] for r in rows.tolist()])
