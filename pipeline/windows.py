"""Event-time tumbling windows over Arrow/polars tables, one batch at a time.

A window is declared (:class:`TumblingWindow`: ``duration_ms``, ``grace_ms``)
and computes a tuple of :class:`~pipeline.aggregators.Aggregator` objects that
share one small contract, so a new aggregate is one class (in
:mod:`pipeline.aggregators`, which also owns the window columns):

- ``initialize()``: state columns for the events of one (series, window) group;
- ``add()``: combine the state rows of one group (older rows first);
- ``result()``: the final column from the state.

:class:`WindowState` holds the open windows of one Kafka partition and applies
a batch of events with polars ``group_by`` (never a Python loop per event).
Semantics, identical to processing the events one by one in offset order:

- windows are aligned to the epoch: ``window_start = floor(ts / duration) * duration``;
- the watermark is the partition's max event time seen minus ``grace_ms``;
  the watermark *before* each event decides whether it is late;
- an event is late when its window has already closed: its end is at or
  below the watermark, or at or below the end of the last window emitted for
  its series (an idle series is closed early);
- a window closes when the watermark reaches its end, or when its series is
  closed for idleness; emitted windows of a series are preceded by ``count=0``
  rows filling any gap since its previous window (gaps longer than
  ``max_gap_windows`` are not filled: the series is treated as restarted);
- ``first``/``last`` are by event time, ties broken by offset.

>>> w = TumblingWindow(duration_ms=10, grace_ms=0)
>>> st = WindowState(w)
>>> ev = pl.DataFrame({"series": ["a", "a", "a"], "ts": [1, 5, 23], "value": [1.0, 3.0, 7.0],
...                    "offset": [0, 1, 2], "seq": [0, 1, 2]})
>>> out = st.add(ev)
>>> out.closed.select("window_start", "count", "mean").rows()
[(0, 2, 2.0)]
>>> st.commit_offset(3)
2
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import polars as pl

from pipeline.aggregators import DEFAULT_AGGREGATORS, Aggregator
from pipeline.config import WindowSettings

# the columns before the aggregates': which window of which series
KEY_SCHEMA: dict[str, pl.DataType] = {"series": pl.String, "window_start": pl.Int64, "window_end": pl.Int64}
_MIN_TS = -(2**62)
# Queries here are small (one poll); polars' default engine for lazy queries (streaming) is slower
# on them than the in-memory one that eager DataFrame methods use.
ENGINE = "in-memory"


@dataclass(frozen=True)
class TumblingWindow:
    """Declaration of epoch-aligned event-time tumbling windows."""

    duration_ms: int
    grace_ms: int = 0
    max_gap_windows: int = 100_000
    aggregators: tuple[Aggregator, ...] = DEFAULT_AGGREGATORS

    @classmethod
    def from_settings(cls, w: WindowSettings) -> TumblingWindow:
        return cls(duration_ms=w.length_ms, grace_ms=w.lateness_ms, max_gap_windows=w.max_gap_windows)

    def __post_init__(self) -> None:
        if self.duration_ms < 1 or self.grace_ms < 0 or self.max_gap_windows < 0:
            raise ValueError("TumblingWindow needs duration_ms >= 1, grace_ms >= 0, max_gap_windows >= 0")
        if self.aggregators[0].name != "count":
            raise ValueError("the first aggregator must be Count (gap rows are count = 0)")

    @property
    def schema(self) -> dict[str, pl.DataType]:
        return window_schema(self.aggregators)

    def start_of(self, ts: pl.Expr) -> pl.Expr:
        return (ts // self.duration_ms) * self.duration_ms


def window_schema(aggregators: Iterable[Aggregator]) -> dict[str, pl.DataType]:
    """Columns and dtypes of the windows that ``aggregators`` compute."""
    return {**KEY_SCHEMA, **{a.name: a.dtype for a in aggregators}}


WINDOW_SCHEMA: dict[str, pl.DataType] = window_schema(DEFAULT_AGGREGATORS)


@dataclass
class Added:
    """Result of :meth:`WindowState.add`: late events (for the DLQ) and closed windows."""

    late: pl.DataFrame
    closed: pl.DataFrame


@dataclass
class WindowState:
    """Open windows of one partition; memory grows with series × open windows, not events.

    ``max_ts`` and ``closed_until`` (end of the last window emitted per series)
    are what a restarted job restores to continue exactly where it stopped.
    """

    spec: TumblingWindow
    max_ts: int | None = None
    closed_until: dict[str, int] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    open: pl.DataFrame | None = None
    # Where ``closed_until`` of a series not in it is looked up the first time the series is seen (None: it
    # holds every series): a state rebuilt from the store with only its recent series' ends, the others
    # read when they come back (see pipeline.ingest.ingestor.Ingestor._assign).
    lookup: Callable[[list[str]], dict[str, int]] | None = None
    _looked_up: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.open is None:
            self.open = self._empty_open()

    def _empty_open(self) -> pl.DataFrame:
        probe = pl.DataFrame(schema={"series": pl.String, "ts": pl.Int64, "value": pl.Float64, "offset": pl.Int64})
        return self._partial(probe.with_columns(window_start=pl.col("ts"))).collect(engine=ENGINE)

    @property
    def watermark(self) -> int | None:
        return None if self.max_ts is None else self.max_ts - self.spec.grace_ms

    @property
    def n_open(self) -> int:
        return self.open.height

    def _partial(self, events: pl.DataFrame) -> pl.LazyFrame:
        """Aggregate events (in offset order) per (series, window); a stable sort by event time
        first, unless they are already in that order (the usual case, checked in one pass)."""
        if not events.get_column("ts").is_sorted():
            events = events.sort("ts", maintain_order=True)
        init = [e for a in self.spec.aggregators for e in a.initialize()]
        return events.lazy().group_by("series", "window_start", maintain_order=True).agg(
            *init, pl.col("offset").min().alias("min_offset")
        )

    def add(self, events: pl.DataFrame, now: float | None = None) -> Added:
        """Apply events (``series, ts, value, offset, seq`` in offset order); close what the watermark passed.

        Written as few polars queries (three ``collect`` calls when nothing is late): the ingest
        worker thread gives up the GIL during each one and must win it back afterwards from the
        thread polling Kafka.
        """
        L = self.spec.duration_ms
        if events.height == 0:
            return Added(events, pl.DataFrame(schema=self.spec.schema))
        prev_max = _MIN_TS if self.max_ts is None else self.max_ts
        keys = events.get_column("series").unique().to_list()
        if self.lookup is not None:
            unknown = [k for k in keys if k not in self.closed_until and k not in self._looked_up]
            if unknown:
                self.closed_until.update(self.lookup(unknown))
                self._looked_up.update(unknown)
        ev = events.lazy().with_columns(window_start=self.spec.start_of(pl.col("ts"))).with_columns(
            _wm_before=pl.max_horizontal(pl.col("ts").cum_max().shift(1, fill_value=prev_max), pl.lit(prev_max))
            - self.spec.grace_ms
        )
        late_expr = pl.col("window_start") + L <= pl.col("_wm_before")
        known = [(s, self.closed_until[s]) for s in keys if s in self.closed_until]
        if known:
            cu = pl.DataFrame(known, schema={"series": pl.String, "_closed_until": pl.Int64}, orient="row")
            ev = ev.join(cu.lazy(), on="series", how="left", maintain_order="left")
            late_expr = late_expr | (pl.col("window_start") + L <= pl.col("_closed_until")).fill_null(False)
        ev = ev.with_columns(_late=late_expr).collect(engine=ENGINE)
        if ev.get_column("_late").any():
            late = ev.filter(pl.col("_late")).select(events.columns)
            accepted = ev.filter(~pl.col("_late"))
        else:
            late, accepted = events.clear(), ev
        self.max_ts = max(prev_max, int(ev.get_column("ts").max()))
        if now is None:
            now = time.monotonic()
        for s in keys:
            self.last_seen[s] = now
        wm = self.watermark
        if accepted.height:
            merged = self._partial(accepted)
            if self.open.height:
                merge = [e for a in self.spec.aggregators for e in a.add()]
                merged = pl.concat([self.open.lazy(), merged]).group_by(
                    "series", "window_start", maintain_order=True
                ).agg(*merge, pl.col("min_offset").min())
            opened = merged.with_columns(_due=pl.col("window_start") + L <= wm).collect(engine=ENGINE)
        else:
            opened = self.open.with_columns(_due=pl.col("window_start") + L <= wm)
        due = opened.get_column("_due")
        if due.any():
            parts = opened.partition_by("_due", as_dict=True, include_key=False)
            closed = parts[(True,)]
            self.open = parts.get((False,), closed.clear())
        else:
            closed, self.open = opened.clear().drop("_due"), opened.drop("_due")
        return Added(late, self._emit(closed))

    def close_series(self, series: Iterable[str]) -> pl.DataFrame:
        """Close every open window of these series now (idle timeout); return the closed windows."""
        names = list(series)
        mask = pl.col("series").is_in(names)
        closed = self.open.filter(mask)
        self.open = self.open.filter(~mask)
        for s in names:
            self.last_seen.pop(s, None)
        return self._emit(closed)

    def idle_series(self, now: float, timeout_s: float) -> list[str]:
        """Series with open windows that have seen no event for ``timeout_s`` of wall-clock time."""
        if not self.open.height:
            return []
        cutoff = now - timeout_s
        return [s for s in self.open["series"].unique().to_list() if self.last_seen.get(s, now) <= cutoff]

    def commit_offset(self, position: int) -> int:
        """The offset safe to commit: ``position``, or the earliest event of a still-open window."""
        if self.open.height == 0:
            return position
        return min(position, int(self.open["min_offset"].min()))

    def _emit(self, closed: pl.DataFrame) -> pl.DataFrame:
        """Finalise closed windows, fill gaps since each series' previous window, advance ``closed_until``."""
        L = self.spec.duration_ms
        if closed.height == 0:
            return pl.DataFrame(schema=self.spec.schema)
        keys = closed.get_column("series").unique().to_list()
        prev = pl.DataFrame(
            {"series": keys, "_prev_end": [self.closed_until.get(s) for s in keys]},
            schema={"series": pl.String, "_prev_end": pl.Int64},
        )
        base = (
            closed.lazy()
            .sort("series", "window_start")
            .join(prev.lazy(), on="series", how="left", maintain_order="left")
            .with_columns(
                _prev_end=pl.coalesce(pl.col("window_start").shift(1).over("series") + L, pl.col("_prev_end"))
            )
        )
        rows = base.select(
            "series",
            "window_start",
            (pl.col("window_start") + L).alias("window_end"),
            *[a.result().alias(a.name) for a in self.spec.aggregators],
        )
        gap = (pl.col("window_start") - pl.col("_prev_end")) // L
        fills = (
            base.filter((gap > 0) & (gap <= self.spec.max_gap_windows))
            .select("series", pl.int_ranges("_prev_end", "window_start", L, dtype=pl.Int64).alias("window_start"))
            .explode("window_start")
            .with_columns(window_end=pl.col("window_start") + L, count=pl.lit(0, dtype=pl.Int64))
        )
        out = (
            pl.concat([rows, fills], how="diagonal_relaxed")
            .sort("series", "window_start")
            .select(pl.col(k).cast(v) for k, v in self.spec.schema.items())
        )
        ends = closed.lazy().group_by("series").agg(pl.col("window_start").max() + L)
        out, ends = pl.collect_all([out, ends], engine=ENGINE)
        self.closed_until.update(
            zip(ends.get_column("series").to_list(), ends.get_column("window_start").to_list(), strict=True)
        )
        return out
