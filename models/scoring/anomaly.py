"""Anomalies: settled actuals that fall outside the served central interval of ``anomalies.level``.

When a window closes, the forecast job settles its actual against the forecast issued one step before
(the freshest, step ``h = 1``) and gives it a two-sided tail probability under the served quantiles
(:func:`tail_probability`). An actual outside the served ``level`` interval, i.e. below quantile
``(1 - level) / 2`` or above ``(1 + level) / 2`` (the quantiles the settings require), is an anomaly: a
message on ``topics.anomalies`` (:mod:`pipeline.anomalies_io`).

The served quantiles are calibrated (:mod:`models.scoring.calibration`), so every level, the anomaly
level's two included, covers what it claims in the long run: on data without anomalies, the share of
actuals flagged tends to ``1 - level`` (0.02 at the default). The flags are of the forecast's intervals,
not a separate detector: where the model is wrong, the interval is wide and a flag needs a larger
miss; where it is sharp, a smaller one.

The tail probability interpolates the served quantile function linearly between its levels, and beyond
the outermost it uses exponential tails through the two outermost quantiles of each side. An actual
outside the level interval has a tail probability below ``1 - level``; one inside, at or above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TINY = 1e-12


def cdf(served: np.ndarray, quantiles: Sequence[float], actual: np.ndarray) -> np.ndarray:
    """``P(Y <= actual)`` ``(N,)`` under the served quantiles ``(N, Q)`` (ascending, at ``quantiles``), by the
    interpolation of the module docstring."""
    tau = np.asarray(quantiles, dtype=np.float64)
    q = np.asarray(served, dtype=np.float64)
    y = np.asarray(actual, dtype=np.float64)
    n, nq = q.shape
    out = np.empty(n)
    # inside: linear between consecutive knots (a flat stretch of equal quantiles: its upper level)
    k = np.clip((q <= y[:, None]).sum(axis=1), 1, nq - 1)  # knots k-1 and k bracket y where inside
    rows = np.arange(n)
    lo_q, hi_q = q[rows, k - 1], q[rows, k]
    span = hi_q - lo_q
    frac = np.where(span > TINY, (y - lo_q) / np.where(span > TINY, span, 1.0), 1.0)
    out[:] = tau[k - 1] + np.clip(frac, 0.0, 1.0) * (tau[k] - tau[k - 1])
    # below the lowest knot: tau_0 * exp(-(q_0 - y) / b), b through the two lowest knots
    below = y < q[:, 0]
    if below.any():
        b = (q[below, 1] - q[below, 0]) / np.log(tau[1] / tau[0]) if nq > 1 else np.ones(below.sum())
        b = np.maximum(b, TINY)
        out[below] = tau[0] * np.exp(-(q[below, 0] - y[below]) / b)
    above = y > q[:, -1]
    if above.any():
        b = (q[above, -1] - q[above, -2]) / np.log((1 - tau[-2]) / (1 - tau[-1])) if nq > 1 else np.ones(above.sum())
        b = np.maximum(b, TINY)
        out[above] = 1.0 - (1 - tau[-1]) * np.exp(-(y[above] - q[above, -1]) / b)
    return out


def tail_probability(served: np.ndarray, quantiles: Sequence[float], actual: np.ndarray) -> np.ndarray:
    """Two-sided tail probability ``2 min(F(y), 1 - F(y))`` ``(N,)`` of each actual under its served
    quantiles (:func:`cdf`): 1 at the median, small far out on either side."""
    f = cdf(served, quantiles, actual)
    return np.clip(2.0 * np.minimum(f, 1.0 - f), 0.0, 1.0)


def outside(served: np.ndarray, indices: tuple[int, int], actual: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the actual is strictly below the served quantile ``indices[0]`` or above ``indices[1]``
    (a NaN actual, a gap window, is never outside)."""
    y = np.asarray(actual, dtype=np.float64)
    lo, hi = indices
    return (y < served[:, lo]) | (y > served[:, hi])
