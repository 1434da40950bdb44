"""The live accuracy report of ``rollcast scores``: score messages kept under the one rule of live accuracy
(:class:`~models.scoring.accuracy.LastWindows`), summed per model version and series, and printed as
tables or JSON, or plotted over time.

:class:`Scores` keeps what the report needs of each score message (a repeat of a series, version and
``last_window_end`` counts once); :func:`summarise` sums them per version and series, with an "all
series" row; :func:`format_tables` and :func:`as_json` print that summary; :func:`timeline` and
:func:`plot` show MAE and coverage per window over time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.scoring.accuracy import LastWindows, LiveTotals, totals_of
from pipeline.quantiles import nominal_coverage
from pipeline.scores_io import decode_score

log = logging.getLogger("rollcast.scores")

ALL_SERIES = "all series"
COLUMNS = ("series", "forecasts", "points", "MAE", "rel MAE", "coverage", "model cov", "last window (UTC)")


@dataclass
class Score:
    """What is kept of one score message."""

    series: str
    model: str
    version: str
    last_window_end: int
    step_ms: int
    nominal: float | None  # the nominal coverage of the interval measured (pipeline.quantiles)
    totals: LiveTotals


class Scores:
    """Score messages, one per (series, model version, last_window_end): a repeat counts once."""

    def __init__(self, series: set[str] | None = None):
        self.series = series  # only these, when set
        # per version and window, (arrival number, score): selections keep the order the scores arrived in
        self._kept: LastWindows[list[tuple[int, Score]]] = LastWindows(list)
        self._arrived = 0

    def add_value(self, value: bytes | None) -> bool:
        """Add one record's value; True when it is a score of a wanted series (a repeat included)."""
        msg = decode_score(value)
        if msg is None or (self.series is not None and msg["series"] not in self.series):
            return False
        model = msg["model"]
        if model.get("version") is None:
            return False
        try:
            totals = totals_of(msg)
            qs = [float(q) for q in msg.get("quantiles") or ()]
            score = Score(msg["series"], str(model.get("name", "")), str(model["version"]),
                          msg["last_window_end"], int(msg.get("step_ms") or 1),
                          nominal_coverage(qs) if len(qs) >= 2 else None, totals)
        except (KeyError, TypeError, ValueError):
            log.debug("skipping a malformed score of %s", msg.get("series"))
            return False
        kept = self._kept.bin(score.version, score.last_window_end, score.step_ms, score.series)
        if kept is not None:
            kept.append((self._arrived, score))
            self._arrived += 1
        return True

    def selected(self, last_windows: int | None) -> list[Score]:
        """The scores, or per version those issued in its last ``last_windows`` windows, in arrival order."""
        chosen = [s for v in self._kept.versions() for _, kept in self._kept.last(v, last_windows) for s in kept]
        return [s for _, s in sorted(chosen, key=lambda x: x[0])]


@dataclass
class Row:
    series: str
    model: str
    version: str
    forecasts: int = 0
    last_window_end: int = 0
    totals: LiveTotals = field(default_factory=LiveTotals)

    def add(self, s: Score) -> None:
        self.forecasts += 1
        self.last_window_end = max(self.last_window_end, s.last_window_end)
        self.totals.add(s.totals)

    def as_dict(self) -> dict[str, Any]:
        return {"series": self.series, "model": self.model, "version": self.version, "forecasts": self.forecasts,
                **{k: _finite(v) for k, v in self.totals.as_dict().items()},
                "last_window_end": self.last_window_end}


def _finite(v: float) -> float | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


def summarise(scores: Iterable[Score]) -> list[dict[str, Any]]:
    """Per model version (in version order): its rows per series and its all-series row."""
    versions: dict[str, dict[str, Any]] = {}
    for s in scores:
        v = versions.setdefault(s.version, {"model": s.model, "version": s.version, "nominal_coverage": s.nominal,
                                             "series": {}, "all": Row(ALL_SERIES, s.model, s.version)})
        v["series"].setdefault(s.series, Row(s.series, s.model, s.version)).add(s)
        v["all"].add(s)
    out = []
    for key in sorted(versions, key=_version_key):
        v = versions[key]
        out.append({"model": v["model"], "version": v["version"], "nominal_coverage": v["nominal_coverage"],
                    "series": [v["series"][s] for s in sorted(v["series"])], "all": v["all"]})
    return out


def as_json(summary: list[dict[str, Any]]) -> str:
    return json.dumps({"versions": [
        {"model": v["model"], "version": v["version"], "nominal_coverage": v["nominal_coverage"],
         "series": [r.as_dict() for r in v["series"]], "all_series": v["all"].as_dict()}
        for v in summary]}, allow_nan=False)


def _fmt(v: float, spec: str) -> str:
    return "–" if not math.isfinite(v) else format(v, spec)


def format_tables(summary: list[dict[str, Any]]) -> str:
    """One plain-text table per model version: a row per series, then the all-series row (RMSE is in
    --json only). Plain text, as wide as it needs: nothing is cut or wrapped, whatever the terminal."""
    from pipeline.latest_forecasts import iso_utc

    out = []
    for v in summary:
        nominal = f", nominal coverage {v['nominal_coverage']:.2f}" if v["nominal_coverage"] is not None else ""
        cells = [[r.series, str(r.forecasts), str(r.totals.points), _fmt(r.totals.mae, ".4g"),
                  _fmt(r.totals.relative_mae, ".3f"), _fmt(r.totals.coverage, ".3f"),
                  _fmt(r.totals.model_coverage, ".3f"), iso_utc(r.last_window_end)[:16]]
                 for r in [*v["series"], v["all"]]]
        widths = [max(len(c[i]) for c in [list(COLUMNS), *cells]) for i in range(len(COLUMNS))]

        def line(row: list[str] | tuple[str, ...], widths: list[int] = widths) -> str:
            return "  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        out += [f"model {v['model']} v{v['version']}: live accuracy{nominal}", line(COLUMNS), rule,
                *(line(c) for c in cells[:-1]), rule, line(cells[-1]), ""]
    return "\n".join(out)


def timeline(scores: list[Score]) -> dict[str, list[tuple[int, LiveTotals]]]:
    """Per ``"MODEL vVERSION"`` (in version order), the sums of the forecasts issued after each window
    (by last_window_end), oldest first."""
    by: dict[str, dict[int, LiveTotals]] = {}
    names: dict[str, str] = {}
    for s in scores:
        by.setdefault(s.version, {}).setdefault(s.last_window_end, LiveTotals()).add(s.totals)
        names[s.version] = f"{s.model} v{s.version}"
    return {names[v]: sorted(by[v].items()) for v in sorted(by, key=_version_key)}


def plot(scores: list[Score], path: Path) -> None:
    """A PNG of MAE and coverage per window over time for each version, with the nominal coverages."""
    from models.plots import plot_live_scores

    nominal = sorted({s.nominal for s in scores if s.nominal is not None})
    plot_live_scores(timeline(scores), nominal, path)
