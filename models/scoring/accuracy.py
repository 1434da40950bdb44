"""Live accuracy: the error sums of scored forecasts and the one rule that selects them.

:class:`LiveTotals` holds the sums of a set of scored points (MAE, RMSE, MAE relative to seasonal naive,
coverage of the served and of the model's own interval); :class:`LiveAccuracy` keeps them per model
version and window, a score published twice counting once, and answers "the last N windows of a
version". The forecast job's Prometheus gauges, the train job's drift trigger and MLflow live metrics,
and ``rollcast scores`` are all computed by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np


@dataclass
class LiveTotals:
    """Sums over scored points (steps with a known actual)."""

    points: int = 0
    abs_error: float = 0.0
    sq_error: float = 0.0
    naive_abs_error: float = 0.0
    inside: int = 0
    model_inside: int = 0

    def add(self, other: LiveTotals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def mae(self) -> float:
        return self.abs_error / self.points if self.points else math.nan

    @property
    def rmse(self) -> float:
        return math.sqrt(self.sq_error / self.points) if self.points else math.nan

    @property
    def relative_mae(self) -> float:
        """MAE over seasonal naive's MAE on the same points (< 1: better than seasonal naive)."""
        return self.abs_error / self.naive_abs_error if self.naive_abs_error > 0 else math.nan

    @property
    def coverage(self) -> float:
        """Share of actuals inside the served outer interval."""
        return self.inside / self.points if self.points else math.nan

    @property
    def model_coverage(self) -> float:
        """Share of actuals inside the model's own outer interval."""
        return self.model_inside / self.points if self.points else math.nan

    def as_dict(self) -> dict[str, float]:
        return {"points": self.points, "mae": self.mae, "rmse": self.rmse, "relative_mae": self.relative_mae,
                "coverage": self.coverage, "model_coverage": self.model_coverage}


def totals_of(message: Mapping[str, Any]) -> LiveTotals:
    """The sums of one decoded score message's known points."""
    t = LiveTotals()
    for p in message.get("points", ()):
        if p.get("actual") is None or p.get("abs_error") is None:
            continue
        t.points += 1
        t.abs_error += float(p["abs_error"])
        t.sq_error += float(p["sq_error"])
        t.naive_abs_error += float(p["naive_abs_error"]) if p.get("naive_abs_error") is not None else 0.0
        t.inside += bool(p["inside"])
        t.model_inside += bool(p["model_inside"])
    return t


class LiveAccuracy:
    """Per model version, the sums of the scored forecasts issued in the last ``windows`` windows (by
    ``last_window_end``: the newest seen, and the ``windows - 1`` before it)."""

    def __init__(self, windows: int):
        self.windows = int(windows)
        self._by_version: dict[str, dict[int, LiveTotals]] = {}
        self._seen: dict[str, dict[int, set[str]]] = {}  # series counted per (version, window): repeats once
        self._step: dict[str, int] = {}
        self._newest: dict[str, int] = {}

    def add(self, version: str, last_window_end: int, step_ms: int, totals: LiveTotals,
            series: str | None = None) -> None:
        """Add one scored forecast's sums. With ``series``, a repeat of a (series, window, version) already
        added is not counted again (a score republished after a restart carries the same values)."""
        if series is not None:
            seen = self._seen.setdefault(version, {}).setdefault(int(last_window_end), set())
            if series in seen:
                return
            seen.add(series)
        bins = self._by_version.setdefault(version, {})
        bins.setdefault(int(last_window_end), LiveTotals()).add(totals)
        self._step[version] = int(step_ms)
        newest = max(self._newest.get(version, last_window_end), int(last_window_end))
        self._newest[version] = newest
        oldest = newest - (self.windows - 1) * int(step_ms)
        if len(bins) > self.windows:
            for end in [e for e in bins if e < oldest]:
                del bins[end]
                self._seen.get(version, {}).pop(end, None)

    def add_message(self, message: Mapping[str, Any]) -> str | None:
        """Add a decoded score message; its model version, or None when it is not a score."""
        version = (message.get("model") or {}).get("version")
        if version is None:
            return None
        self.add(str(version), int(message["last_window_end"]), int(message.get("step_ms") or 1),
                 totals_of(message), series=message["series"])
        return str(version)

    def versions(self) -> list[str]:
        return list(self._by_version)

    def newest(self, version: str) -> int | None:
        return self._newest.get(version)

    def totals(self, version: str, windows: int | None = None) -> LiveTotals:
        """Sums over the last ``windows`` (default: all kept) windows of ``version``."""
        bins = self._by_version.get(version, {})
        out = LiveTotals()
        if not bins:
            return out
        n = self.windows if windows is None else min(int(windows), self.windows)
        oldest = self._newest[version] - (n - 1) * self._step[version]
        for end, t in bins.items():
            if end >= oldest:
                out.add(t)
        return out


def score_totals(actual: np.ndarray, served: np.ndarray, model_q: np.ndarray, naive: np.ndarray,
                 quantiles: list[float]) -> list[LiveTotals]:
    """The :class:`LiveTotals` of each of ``n`` forecasts (as :func:`totals_of` of their messages)."""
    median = list(quantiles).index(0.5)
    actual = actual.astype(np.float64)
    known = np.isfinite(actual)
    a = np.where(known, actual, 0.0)
    served = served.astype(np.float64)
    abs_err = np.where(known, np.abs(a - served[..., median]), 0.0)
    naive_err = np.abs(a - naive)
    naive_err = np.where(known & np.isfinite(naive_err), naive_err, 0.0)
    inside = known & (served[..., 0] <= a) & (a <= served[..., -1])
    model_inside = known & (model_q[..., 0] <= a) & (a <= model_q[..., -1])
    sums = [known.sum(1), abs_err.sum(1), (abs_err ** 2).sum(1), naive_err.sum(1), inside.sum(1),
            model_inside.sum(1)]
    return [LiveTotals(int(p), float(e), float(s), float(ne), int(i), int(mi))
            for p, e, s, ne, i, mi in zip(*(x.tolist() for x in sums), strict=True)]
