"""Print the live accuracy of the served forecasts, per series and model version, from the scores topic.

Reads the scores topic (one message per forecast whose windows have all closed, README "Message
formats") from the beginning to its end, and prints per model version a table of every series:
forecasts and points scored, MAE (and RMSE in --json), MAE relative to seasonal naive's on the same points,
coverage of the served (calibrated) outer interval, coverage of the model's own interval, and the
last window end of the newest forecast scored, with an "all series" row. A score published again (a restarted forecast job
repeats some with the same values) is counted once: one per series, model version and
last_window_end. --last-windows N keeps, per version, the forecasts issued in the last N windows
(the version's newest scored forecast and the N-1 windows before it). --series only reads the
partitions of those series. --json prints the same figures as one JSON document. --plot FILE
writes a PNG of MAE and coverage per window over time for each version, with the nominal coverage.
--follow keeps reading and prints (and plots) again as scores arrive, until Ctrl-C or SIGTERM.
With no scores yet it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.scoring.accuracy import LiveTotals, totals_of
from pipeline.config import Settings
from pipeline.scores_io import decode_score

HELP = "print live accuracy per series and model version from the scores topic"

log = logging.getLogger("rollcast.scores")

ALL_SERIES = "all series"
REPRINT_S = 1.0  # --follow prints at most this often


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--series", nargs="+", metavar="S", help="only these series")
    parser.add_argument("--last-windows", type=int, metavar="N",
                        help="per model version, only forecasts issued in its last N windows")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--follow", action="store_true",
                        help="keep reading and print again as scores arrive, until Ctrl-C or SIGTERM")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write MAE and coverage over time to a PNG")
    parser.add_argument("--idle-ms", type=int, default=1500,
                        help="the topic's end: no record for this long (default 1500)")


@dataclass
class Score:
    """What is kept of one score message."""

    series: str
    model: str
    version: str
    last_window_end: int
    step_ms: int
    nominal: float | None  # the served outer interval's nominal coverage (highest - lowest quantile)
    totals: LiveTotals


@dataclass
class Scores:
    """Score messages, one per (series, model version, last_window_end): a repeat replaces its twin."""

    series: set[str] | None = None  # only these, when set
    by_key: dict[tuple[str, str, int], Score] = field(default_factory=dict)

    def add_value(self, value: bytes | None) -> bool:
        """Add one record's value; True when it is a score of a wanted series."""
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
                          max(qs) - min(qs) if len(qs) >= 2 else None, totals)
        except (KeyError, TypeError, ValueError):
            log.debug("skipping a malformed score of %s", msg.get("series"))
            return False
        self.by_key[(score.series, score.version, score.last_window_end)] = score
        return True

    def selected(self, last_windows: int | None) -> list[Score]:
        """The scores, or per version those issued in its last ``last_windows`` windows."""
        scores = list(self.by_key.values())
        if last_windows is None:
            return scores
        newest: dict[str, Score] = {}
        for s in scores:
            if s.version not in newest or s.last_window_end > newest[s.version].last_window_end:
                newest[s.version] = s
        oldest = {v: s.last_window_end - (last_windows - 1) * s.step_ms for v, s in newest.items()}
        return [s for s in scores if s.last_window_end >= oldest[s.version]]


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


COLUMNS = ("series", "forecasts", "points", "MAE", "rel MAE", "coverage", "model cov", "last window (UTC)")


def format_tables(summary: list[dict[str, Any]]) -> str:
    """One plain-text table per model version: a row per series, then the all-series row (RMSE is in
    --json only). Plain text, as wide as it needs: nothing is cut or wrapped, whatever the terminal."""
    from jobs.query import iso_utc

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
    from models.plots import plot_live_scores

    nominal = sorted({s.nominal for s in scores if s.nominal is not None})
    plot_live_scores(timeline(scores), nominal, path)


def report(scores: Scores, args: argparse.Namespace) -> bool:
    """Print (and plot) the figures; False when there is no score to report."""
    chosen = scores.selected(args.last_windows)
    if not chosen:
        which = f" for {', '.join(args.series)}" if args.series else ""
        print(json.dumps({"versions": []}) if args.json else f"no scores yet{which}", flush=True)
        return False
    summary = summarise(chosen)
    if args.json:
        print(as_json(summary), flush=True)
    else:
        print(format_tables(summary), flush=True)
    if args.plot:
        plot(chosen, args.plot)
        if not args.json:
            print(f"wrote {args.plot}", flush=True)
    return True


def run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.kafka.clients import poll_promptly
    from pipeline.kafka.readers import open_at_beginning, read_to_end
    from pipeline.runtime import Shutdown

    if args.last_windows is not None and args.last_windows < 1:
        raise ConfigError("--last-windows must be at least 1")
    topic = settings.topics.scores
    consumer = open_at_beginning(settings, topic, args.series)
    if consumer is None:
        print(json.dumps({"versions": []}) if args.json else
              f"no scores yet: topic {topic} does not exist on {settings.kafka.bootstrap_servers}", flush=True)
        return 0
    scores = Scores(set(args.series) if args.series else None)
    try:
        read_to_end(consumer, args.idle_ms, scores.add_value)
        report(scores, args)
        if not args.follow:
            return 0
        shutdown = Shutdown("scores")  # SIGTERM and Ctrl-C end the loop at its next poll
        pending, printed_at = False, time.monotonic()
        while not shutdown.requested:
            for records in poll_promptly(consumer, 500).values():
                for rec in records:
                    pending |= scores.add_value(rec.value)
            if pending and time.monotonic() - printed_at >= REPRINT_S:
                report(scores, args)
                pending, printed_at = False, time.monotonic()
        if pending:
            report(scores, args)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
