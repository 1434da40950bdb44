"""Which of the forecast quantiles make "the interval" that coverage is measured on, and the anomaly level's.

Forecasts carry every quantile of ``model.quantiles`` (default 0.01, 0.1, 0.5, 0.9, 0.99). Coverage, in
backtests, on the holdout, in live scores and in the drift monitor, is of one central interval: the 80%
one, q0.1 to q0.9, when both are among the quantiles, else the outermost pair (the lowest to the highest
quantile). Anomalies (``anomalies.level``) use the central interval of their level, whose two quantiles
the settings require.
"""

from __future__ import annotations

from collections.abc import Sequence

INTERVAL = 0.8  # the nominal coverage of the interval that coverage is measured on, when it is served
_EPS = 1e-9


def level_indices(quantiles: Sequence[float], level: float) -> tuple[int, int] | None:
    """Indices of the quantiles ``(1 - level) / 2`` and ``(1 + level) / 2`` (the central ``level`` interval),
    or None when either is missing."""
    qs = [float(q) for q in quantiles]
    lo = next((i for i, q in enumerate(qs) if abs(q - (1 - level) / 2) < _EPS), None)
    hi = next((i for i, q in enumerate(qs) if abs(q - (1 + level) / 2) < _EPS), None)
    return None if lo is None or hi is None else (lo, hi)


def interval_indices(quantiles: Sequence[float]) -> tuple[int, int]:
    """The indices of the interval coverage is measured on: the 80% interval's quantiles when both are
    there, else the lowest and the highest (module docstring)."""
    pair = level_indices(quantiles, INTERVAL)
    return pair if pair is not None else (0, len(quantiles) - 1)


def nominal_coverage(quantiles: Sequence[float]) -> float:
    """The nominal coverage of :func:`interval_indices`' interval."""
    lo, hi = interval_indices(quantiles)
    return float(quantiles[hi]) - float(quantiles[lo])
