"""Live accuracy: the sums of scored forecasts' errors, and the one rule that selects them.

The scorer computes every per-step error of a batch of scored forecasts once
(:func:`models.scoring.scorer.point_errors`); the forecast job publishes the values they come from
(:func:`pipeline.scores_io.score_messages`; a reader's :func:`~pipeline.scores_io.decode_score` derives
the errors again, in the same way) and sums them
(:meth:`~models.scoring.scorer.PointErrors.totals`) for its live gauges. :class:`LiveTotals` holds the
sums of a set of scored points (MAE, RMSE, MAE relative to seasonal naive, coverage of the served and of
the model's own interval).
:class:`LastWindows` is the rule every live figure follows: per model version, a score published twice
counts once, and "the last N windows of a version" are its newest scored window and the N-1 before it.
:class:`LiveAccuracy` keeps sums under that rule: the forecast job's Prometheus gauges and the train job's
drift trigger and MLflow live metrics are computed by it; ``rollcast scores`` keeps its scores under the
same rule (:class:`models.scoring.report.Scores`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from pipeline.scores_io import as_score


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
        """Share of actuals inside the served interval (q0.1-q0.9, pipeline.quantiles)."""
        return self.inside / self.points if self.points else math.nan

    @property
    def model_coverage(self) -> float:
        """Share of actuals inside the model's own interval (q0.1-q0.9, pipeline.quantiles)."""
        return self.model_inside / self.points if self.points else math.nan

    def as_dict(self) -> dict[str, float]:
        return {"points": self.points, "mae": self.mae, "rmse": self.rmse, "relative_mae": self.relative_mae,
                "coverage": self.coverage, "model_coverage": self.model_coverage}


def totals_of(message: Mapping[str, Any]) -> LiveTotals:
    """The sums of one score message's known points: a score as :func:`pipeline.scores_io.decode_score`
    gives it (either format on the topic), or as parsed from JSON (decoded here; not a score: no
    points)."""
    if "format" not in message or "abs_error" not in message:  # not decoded yet
        message = as_score(message) or {}
    t = LiveTotals()
    columns = (message.get(k) or () for k in ("actual", "abs_error", "sq_error", "naive_abs_error", "inside",
                                              "model_inside"))
    for actual, err, sq, naive_err, inside, model_inside in zip(*columns, strict=False):
        if actual is None or err is None:
            continue
        t.points += 1
        t.abs_error += float(err)
        t.sq_error += float(sq)
        t.naive_abs_error += float(naive_err) if naive_err is not None else 0.0
        t.inside += bool(inside)
        t.model_inside += bool(model_inside)
    return t


B = TypeVar("B")


class LastWindows(Generic[B]):
    """Scored forecasts per model version and window, under the one rule of live accuracy.

    A scored forecast belongs to the window it was issued after (its ``last_window_end``). A repeat of a
    (version, window, series) already added counts once: the first is kept (a score republished after a
    restart carries the same values). "The last N windows" of a version are its newest window and the
    ``N - 1`` before it, by the step of that newest window. Each (version, window) has one bin, made by
    ``new_bin``, of whatever the caller keeps (sums, or the scores themselves). With ``windows``, bins
    older than a version's last ``windows`` windows are dropped as newer ones arrive (bounded memory)
    and no selection reaches further back.

    >>> w = LastWindows(list, windows=2)
    >>> for end, series in [(10, "a"), (20, "a"), (20, "a"), (30, "b")]:
    ...     b = w.bin("1", end, 10, series)
    ...     if b is not None:
    ...         b.append(series)
    >>> w.last("1")
    [(20, ['a']), (30, ['b'])]
    """

    def __init__(self, new_bin: Callable[[], B], windows: int | None = None):
        self.windows = None if windows is None else int(windows)
        self._new_bin = new_bin
        self._bins: dict[str, dict[int, B]] = {}
        self._seen: dict[str, dict[int, set[str]]] = {}  # series added per (version, window)
        self._newest: dict[str, int] = {}
        self._step: dict[str, int] = {}  # the step of the version's newest window

    def bin(self, version: str, last_window_end: int, step_ms: int, series: str | None = None) -> B | None:
        """The bin of ``version``'s window ``last_window_end`` for one more scored forecast, or None when
        it is a repeat of ``series`` there (without ``series``, never a repeat)."""
        end = int(last_window_end)
        if series is not None:
            seen = self._seen.setdefault(version, {}).setdefault(end, set())
            if series in seen:
                return None
            seen.add(series)
        bins = self._bins.setdefault(version, {})
        found = bins.get(end)
        if found is None:
            found = bins[end] = self._new_bin()
        if version not in self._newest or end > self._newest[version]:
            self._newest[version], self._step[version] = end, int(step_ms)
        if self.windows is not None and len(bins) > self.windows:
            oldest = self.oldest(version, self.windows)
            for old in [e for e in bins if e < oldest]:
                del bins[old]
                self._seen.get(version, {}).pop(old, None)
        return found

    def versions(self) -> list[str]:
        return list(self._bins)

    def newest(self, version: str) -> int | None:
        return self._newest.get(version)

    def oldest(self, version: str, windows: int) -> int:
        """The end of the oldest of ``version``'s last ``windows`` windows (it must have one)."""
        return self._newest[version] - (int(windows) - 1) * self._step[version]

    def last(self, version: str, windows: int | None = None) -> list[tuple[int, B]]:
        """``(last_window_end, bin)`` of ``version``'s last ``windows`` windows (default: all kept), in the
        order the windows were first added."""
        bins = self._bins.get(version, {})
        n = self.windows if windows is None else int(windows)
        if n is not None and self.windows is not None:
            n = min(n, self.windows)
        if not bins or n is None:
            return list(bins.items())
        oldest = self.oldest(version, n)
        return [(end, b) for end, b in bins.items() if end >= oldest]


class LiveAccuracy:
    """Per model version, the sums of the scored forecasts issued in the last ``windows`` windows (by
    ``last_window_end``: the newest seen, and the ``windows - 1`` before it), under :class:`LastWindows`'
    rule."""

    def __init__(self, windows: int):
        self.windows = int(windows)
        self._sums: LastWindows[LiveTotals] = LastWindows(LiveTotals, self.windows)

    def add(self, version: str, last_window_end: int, step_ms: int, totals: LiveTotals,
            series: str | None = None) -> None:
        """Add one scored forecast's sums. With ``series``, a repeat of a (series, window, version) already
        added is not counted again (a score republished after a restart carries the same values)."""
        sums = self._sums.bin(version, last_window_end, step_ms, series)
        if sums is not None:
            sums.add(totals)

    def add_message(self, message: Mapping[str, Any]) -> str | None:
        """Add a decoded score message; its model version, or None when it is not a score."""
        version = (message.get("model") or {}).get("version")
        if version is None:
            return None
        self.add(str(version), int(message["last_window_end"]), int(message.get("step_ms") or 1),
                 totals_of(message), series=message["series"])
        return str(version)

    def versions(self) -> list[str]:
        return self._sums.versions()

    def newest(self, version: str) -> int | None:
        return self._sums.newest(version)

    def totals(self, version: str, windows: int | None = None) -> LiveTotals:
        """Sums over the last ``windows`` (default: all kept) windows of ``version``."""
        out = LiveTotals()
        for _, sums in self._sums.last(version, windows):
            out.add(sums)
        return out
