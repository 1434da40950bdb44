"""Point and interval forecast metrics over arrays of any matching shape.

>>> mae([1.0, 2.0], [2.0, 4.0])
1.5
>>> mase([3.0, 5.0], [4.0, 4.0], insample=[1.0, 2.0, 4.0], season=1)
0.6666666666666666
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _pair(y: ArrayLike, yhat: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    a, b = np.broadcast_arrays(a, b)
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def mae(y: ArrayLike, yhat: ArrayLike) -> float:
    """Mean absolute error (NaN pairs ignored)."""
    a, b = _pair(y, yhat)
    return float(np.mean(np.abs(a - b)))


def rmse(y: ArrayLike, yhat: ArrayLike) -> float:
    """Root mean squared error."""
    a, b = _pair(y, yhat)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def smape(y: ArrayLike, yhat: ArrayLike) -> float:
    """Symmetric MAPE in percent, ``100 * mean(2|y - ŷ| / (|y| + |ŷ|))``; 0 where both are 0."""
    a, b = _pair(y, yhat)
    den = np.abs(a) + np.abs(b)
    ratio = np.divide(2 * np.abs(a - b), den, out=np.zeros_like(den), where=den > 0)
    return float(100 * np.mean(ratio))


def seasonal_naive_scale(insample: ArrayLike, season: int = 1) -> float:
    """In-sample MAE of the seasonal-naive forecast ``y[t - m]`` (naive for ``m = 1``)."""
    x = np.asarray(insample, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) <= season:
        return float("nan")
    return float(np.mean(np.abs(x[season:] - x[:-season])))


def mase(y: ArrayLike, yhat: ArrayLike, insample: ArrayLike, season: int = 1) -> float:
    """Mean absolute scaled error: test MAE over the in-sample seasonal-naive MAE."""
    scale = seasonal_naive_scale(insample, season)
    return mae(y, yhat) / scale if scale > 0 else float("nan")


def coverage(y: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> float:
    """Share of ``y`` inside ``[lower, upper]`` (the outer quantile interval)."""
    a = np.asarray(y, dtype=np.float64)
    lo, hi = np.broadcast_arrays(np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64))
    keep = ~np.isnan(a)
    return float(np.mean((a[keep] >= lo[keep]) & (a[keep] <= hi[keep])))
