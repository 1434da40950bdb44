"""Vectorised windows against the per-event reference, with hypothesis."""

from __future__ import annotations

import math

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.aggregators import AGGREGATE_NAMES, DEFAULT_AGGREGATORS, Aggregator
from pipeline.windows import WINDOW_SCHEMA, TumblingWindow, WindowState
from tests.support.reference import reference_windows


def run_batches(items: list[tuple], spec: TumblingWindow, cuts: list[int]) -> tuple[list[dict], list[int]]:
    """Feed items to WindowState in batches split at ``cuts``; idle markers close series between batches."""
    state = WindowState(spec)
    out: list[pl.DataFrame] = []
    late: list[int] = []
    batch: list[tuple] = []

    def flush() -> None:
        if batch:
            ev = pl.DataFrame(
                [(s, ts, v, seq, seq) for _, s, ts, v, seq in batch],
                schema={"series": pl.String, "ts": pl.Int64, "value": pl.Float64, "offset": pl.Int64, "seq": pl.Int64},
                orient="row",
            )
            added = state.add(ev, now=0.0)
            out.append(added.closed)
            late.extend(added.late["seq"].to_list())
            batch.clear()

    for i, item in enumerate(items):
        if item[0] == "idle":
            flush()
            out.append(state.close_series([item[1]]))
            continue
        batch.append(item)
        if i in cuts:
            flush()
    flush()
    df = pl.concat([pl.DataFrame(schema=spec.schema), *out]).sort("series", "window_start")
    return df.to_dicts(), late


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [(r["series"], r["window_start"], r["count"]) for r in got] == [
        (r["series"], r["window_start"], r["count"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        assert g["window_end"] == w["window_end"]
        for k in ("first", "last", "min", "max", "mean", "sum"):
            if w[k] is None:
                assert g[k] is None
            else:
                assert math.isclose(g[k], w[k], rel_tol=1e-9, abs_tol=1e-9), (k, g, w)


item = st.one_of(
    st.tuples(st.just("event"), st.sampled_from(["a", "b", "c"]), st.integers(0, 400),
              st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: round(x, 3))),
    st.tuples(st.just("idle"), st.sampled_from(["a", "b", "c"])),
)


@settings(max_examples=150, deadline=None)
@given(
    raw=st.lists(item, max_size=60),
    length=st.sampled_from([1, 7, 10, 50]),
    grace=st.sampled_from([0, 5, 30]),
    max_gap=st.sampled_from([0, 2, 100]),
    cuts=st.lists(st.integers(0, 60), max_size=8),
)
def test_batches_match_per_event_reference(raw, length, grace, max_gap, cuts):
    items = [(*it, seq) if it[0] == "event" else it for seq, it in enumerate(raw)]
    spec = TumblingWindow(duration_ms=length, grace_ms=grace, max_gap_windows=max_gap)
    got, got_late = run_batches(items, spec, set(cuts))
    want, want_late = reference_windows(items, length, grace, max_gap)
    assert_same(got, want)
    assert sorted(got_late) == sorted(want_late)


def test_out_of_order_late_gap_and_ties():
    spec = TumblingWindow(duration_ms=10, grace_ms=5)
    items = [
        ("event", "a", 3, 1.0, 0), ("event", "a", 1, 2.0, 1),   # out of order inside lateness
        ("event", "a", 3, 9.0, 2),                               # tie on ts 3: last by offset
        ("event", "a", 16, 4.0, 3),                              # wm 11 closes [0,10)
        ("event", "a", 8, 5.0, 4),                               # late
        ("event", "a", 45, 6.0, 5),                              # wm 40: closes [10,20), gaps 20,30 pending
        ("event", "a", 58, 7.0, 6),                              # wm 53: closes [40,50) with gap rows
    ]
    got, late = run_batches(items, spec, {1, 4})
    assert late == [4]
    rows = [(r["window_start"], r["count"], r["first"], r["last"]) for r in got]
    assert rows == [(0, 3, 2.0, 9.0), (10, 1, 4.0, 4.0), (20, 0, None, None), (30, 0, None, None), (40, 1, 6.0, 6.0)]
    want, want_late = reference_windows(items, 10, 5)
    assert_same(got, want)


def test_idle_close_makes_later_events_late_and_commit_offset_holds_open_windows():
    spec = TumblingWindow(duration_ms=100, grace_ms=0)
    state = WindowState(spec)
    ev = pl.DataFrame({"series": ["a", "b"], "ts": [10, 20], "value": [1.0, 2.0], "offset": [7, 8], "seq": [7, 8]})
    state.add(ev, now=0.0)
    assert state.commit_offset(9) == 7
    assert state.idle_series(now=31.0, timeout_s=30.0) == ["a", "b"] or set(state.idle_series(31.0, 30.0)) == {"a", "b"}
    closed = state.close_series(["a"])
    assert closed["series"].to_list() == ["a"] and closed["count"].to_list() == [1]
    assert state.commit_offset(9) == 8
    again = state.add(pl.DataFrame({"series": ["a"], "ts": [50], "value": [3.0], "offset": [9], "seq": [9]}), now=1.0)
    assert again.late["offset"].to_list() == [9]


def test_last_breaks_ties_by_offset_when_ts_is_flagged_sorted():
    # polars answers value.reverse().get(ts.reverse().arg_max()) wrongly for a sorted-flagged ts
    ev = pl.DataFrame({"series": ["a"] * 3, "ts": [1, 1, 25], "value": [1.0, 2.0, 3.0], "offset": [0, 1, 2],
                       "seq": [0, 1, 2]})
    for events in (ev, ev.with_columns(pl.col("ts").set_sorted())):
        closed = WindowState(TumblingWindow(duration_ms=10)).add(events, now=0.0).closed
        assert closed.select("first", "last").rows() == [(1.0, 2.0)]


class _Range(Aggregator):
    """max - min, as a user would add it: one class."""

    name = "range"

    def initialize(self) -> list[pl.Expr]:
        return [pl.col("value").max().alias("_range_max"), pl.col("value").min().alias("_range_min")]

    def add(self) -> list[pl.Expr]:
        return [pl.col("_range_max").max(), pl.col("_range_min").min()]

    def result(self) -> pl.Expr:
        return pl.col("_range_max") - pl.col("_range_min")


def test_the_aggregators_own_the_window_columns() -> None:
    # the Window contract of DESIGN.md, derived from the aggregator classes
    assert list(WINDOW_SCHEMA) == ["series", "window_start", "window_end", *AGGREGATE_NAMES]
    assert AGGREGATE_NAMES == ("count", "first", "last", "min", "max", "mean", "sum")
    dtypes = {"series": pl.String, "window_start": pl.Int64, "window_end": pl.Int64, "count": pl.Int64}
    assert dict(WINDOW_SCHEMA) == {**dtypes, **{k: pl.Float64 for k in AGGREGATE_NAMES[1:]}}
    # a new aggregate is one class: the window computes it and its schema names it
    spec = TumblingWindow(duration_ms=10, aggregators=(*DEFAULT_AGGREGATORS, _Range()))
    assert spec.schema == {**WINDOW_SCHEMA, "range": pl.Float64}
    times, values = [1, 3, 5, 12, 31, 45], [4.0, 1.0, 6.0, 2.0, 0.0, 1.0]
    items = [("e", "a", ts, v, seq) for seq, (ts, v) in enumerate(zip(times, values, strict=True))]
    got, late = run_batches(items, spec, cuts=[1])  # the first window's state is merged across two batches
    assert late == []
    rows = [(r["window_start"], r["count"], r["range"]) for r in got]
    assert rows == [(0, 3, 5.0), (10, 1, 0.0), (20, 0, None), (30, 1, 0.0)]  # 20: a gap row
