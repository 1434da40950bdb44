"""Online conformal calibration of forecast quantiles: quantile tracking per series, horizon step and level.

A model's quantiles are learned on its training span; live they cover less than they claim (the 80%
interval covered 0.65-0.81 of actuals on rolling-origin backtests). :class:`QuantileTracker` corrects
them on the stream, without retraining, with the quantile-tracking update of conformal PID control
(Angelopoulos, Candès and Tibshirani, "Conformal PID Control for Time Series Prediction", NeurIPS 2023;
the "P" part, which is also adaptive conformal inference, Gibbs and Candès, NeurIPS 2021, written on the
quantile scale). For each series, horizon step ``h`` and quantile level ``tau`` (other than the median)
it keeps an offset ``c``, in units of the model's own outer interval width ``w`` at that step:

    served quantile  q~ = q + c * w
    when the actual y of that step is known:  c <- c + eta * (tau - 1{y <= q~})

Every time the actual falls at or below the served quantile, ``c`` drops by ``eta * (1 - tau)``;
every time it falls above, ``c`` rises by ``eta * tau``. So over any T settled windows the share of
actuals at or below ``q~`` is ``tau`` up to ``(|c_T - c_0| / eta) / T``: the long-run coverage of
every served quantile, for each series and step, is what it claims, whatever the data do (the
guarantee needs no exchangeability; it holds under drift). Offsets are clipped to
``+-max_offset`` widths, which keeps that bound finite.

Why per series: the offsets then partition with the series over Kafka partitions (the forecast job
can run as several processes), every series gets the guarantee on its own, and series of different
scales or difficulties do not pull one another's intervals. Why in widths of the model's interval:
the update is scale-free (the same ``eta`` for prices in the thousands and sensors near 1), and the
served interval keeps the model's shape over the horizon and over time.

The median (the point forecast) is not moved. After the offsets, lower quantiles are kept at or below
the median and upper ones at or above it, in order.

The same tracker serves the forecast job (``models.scoring.scorer``) and ``rollcast backtest``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# a model interval narrower than this share of the median's magnitude (or 1e-9 absolute) is taken as
# that wide, so offsets can still widen a collapsed interval
MIN_RELATIVE_WIDTH = 1e-6


class QuantileTracker:
    """Offsets ``(rows, horizon, quantiles)`` of the served quantiles; one row per series."""

    def __init__(self, quantiles: Sequence[float], horizon: int, learning_rate: float = 0.05,
                 max_offset: float = 20.0, rows: int = 0):
        self.quantiles = np.asarray(quantiles, dtype=np.float64)
        if 0.5 not in quantiles:
            raise ValueError("quantiles must include 0.5 (the point forecast)")
        self.median = list(quantiles).index(0.5)
        self.horizon = int(horizon)
        self.learning_rate = float(learning_rate)
        self.max_offset = float(max_offset)
        self.offsets = np.zeros((rows, self.horizon, len(self.quantiles)), dtype=np.float64)
        self.updates = np.zeros((rows, self.horizon), dtype=np.int64)  # settled windows seen per step

    @property
    def rows(self) -> int:
        return len(self.offsets)

    def grow(self, rows: int) -> None:
        """Make room for at least ``rows`` rows (new ones start at offset 0)."""
        if rows > self.rows:
            extra = max(rows, 2 * self.rows, 64) - self.rows
            self.offsets = np.concatenate([self.offsets, np.zeros((extra, *self.offsets.shape[1:]))])
            self.updates = np.concatenate([self.updates, np.zeros((extra, self.horizon), dtype=np.int64)])

    def reset(self, rows: np.ndarray | None = None) -> None:
        """Offsets back to 0 (the model's own quantiles): all rows, or ``rows``."""
        if rows is None:
            self.offsets[:] = 0.0
            self.updates[:] = 0
        else:
            self.offsets[rows] = 0.0
            self.updates[rows] = 0

    def apply(self, rows: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """Served quantiles ``(B, H, Q)`` for the model's ``preds`` ``(B, H, Q)`` of series ``rows``."""
        preds = np.asarray(preds, dtype=np.float64)
        return calibrate(preds, self.offsets[rows, : preds.shape[1]], self.median)

    def update(self, rows: np.ndarray, steps: np.ndarray, served: np.ndarray, actual: np.ndarray) -> None:
        """Settle ``len(rows)`` forecasts: series ``rows``, 0-based horizon ``steps``, the quantiles served
        for that step ``(N, Q)`` and the actual ``(N,)``. NaN actuals (gap windows) are skipped."""
        actual = np.asarray(actual, dtype=np.float64)
        known = np.isfinite(actual) & np.isfinite(served).all(axis=1)
        if not known.any():
            return
        rows, steps = np.asarray(rows)[known], np.asarray(steps)[known]
        below = actual[known, None] <= served[known]
        delta = self.learning_rate * (self.quantiles[None, :] - below)
        delta[:, self.median] = 0.0
        touched = (rows, steps)
        cell = rows * self.horizon + steps
        if np.bincount(cell).max() == 1:  # the forecast job's case: each (row, step) once, a plain scatter
            self.offsets[touched] += delta
            self.updates[touched] += 1
        else:  # repeated cells take every update, in order
            np.add.at(self.offsets, touched, delta)
            np.add.at(self.updates, touched, 1)
        self.offsets[touched] = np.clip(self.offsets[touched], -self.max_offset, self.max_offset)


def calibrate(preds: np.ndarray, offsets: np.ndarray, median: int) -> np.ndarray:
    """``preds + offsets * width``, with lower quantiles kept at or below the median and upper ones at or
    above it, in order (``preds`` and ``offsets`` broadcast over ``(..., H, Q)``)."""
    lo, hi, mid = preds[..., 0], preds[..., -1], preds[..., median]
    floor = np.maximum(MIN_RELATIVE_WIDTH * np.abs(mid), 1e-9)
    width = np.maximum(hi - lo, floor)
    out = preds + offsets * width[..., None]
    out[..., median] = mid
    out[..., :median] = np.minimum(out[..., :median], mid[..., None])
    out[..., median + 1:] = np.maximum(out[..., median + 1:], mid[..., None])
    return np.sort(out, axis=-1)
