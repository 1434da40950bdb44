"""Window aggregates: one class each, the only place a window column is named.

Every :class:`Aggregator` shares one small contract (``initialize``, ``add``,
``result``), and names its column and dtype; the window schema
(:data:`pipeline.windows.WINDOW_SCHEMA`), the targets ``window.target`` accepts
and the backtest's resampling derive from :data:`DEFAULT_AGGREGATORS`, so a new
aggregate is one class added there.

>>> [a.name for a in DEFAULT_AGGREGATORS]
['count', 'first', 'last', 'min', 'max', 'mean', 'sum']
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl


class Aggregator:
    """Contract of one window aggregate; subclasses set ``name``, ``dtype`` (if not Float64) and the three
    methods.

    Events inside a group are in event-time order, equal times in offset order; a group of state
    rows holds at most two, the older first (the open window's, then a new batch's). First and
    last are therefore positional (``first()``, ``last()``): nothing relies on ``arg_min`` or
    ``arg_max``, which polars 2.1 answers wrongly inside a group when the column carries a
    sorted flag.
    """

    name: str = ""
    dtype: ClassVar[pl.DataType] = pl.Float64  # of the window column ``name``

    def initialize(self) -> list[pl.Expr]:
        """State columns from raw events (columns ``ts``, ``value``) of one group."""
        raise NotImplementedError

    def add(self) -> list[pl.Expr]:
        """State columns combining the state rows of one group (one or two, older first)."""
        raise NotImplementedError

    def result(self) -> pl.Expr:
        """The final value (a Float64 or Int64 expression) from the state columns."""
        raise NotImplementedError


class Count(Aggregator):
    name = "count"
    dtype = pl.Int64

    def initialize(self) -> list[pl.Expr]:
        return [pl.len().cast(pl.Int64).alias("count")]

    def add(self) -> list[pl.Expr]:
        return [pl.col("count").sum()]

    def result(self) -> pl.Expr:
        return pl.col("count").cast(self.dtype)


class _Reduce(Aggregator):
    """sum/min/max: the state is the aggregate itself, combined with the same reduction."""

    def initialize(self) -> list[pl.Expr]:
        return [getattr(pl.col("value"), self.name)().alias(self.name)]

    def add(self) -> list[pl.Expr]:
        return [getattr(pl.col(self.name), self.name)()]

    def result(self) -> pl.Expr:
        return pl.col(self.name).cast(self.dtype)


class Sum(_Reduce):
    name = "sum"


class Min(_Reduce):
    name = "min"


class Max(_Reduce):
    name = "max"


class Mean(Aggregator):
    name = "mean"

    def initialize(self) -> list[pl.Expr]:
        return [pl.col("value").sum().alias("_mean_sum"), pl.len().cast(pl.Int64).alias("_mean_n")]

    def add(self) -> list[pl.Expr]:
        return [pl.col("_mean_sum").sum(), pl.col("_mean_n").sum()]

    def result(self) -> pl.Expr:
        return (pl.col("_mean_sum") / pl.col("_mean_n")).cast(self.dtype)


class First(Aggregator):
    """Value of the earliest event (smallest offset among equal times)."""

    name = "first"

    def initialize(self) -> list[pl.Expr]:
        return [pl.col("value").first().alias("first"), pl.col("ts").first().alias("_first_ts")]

    def add(self) -> list[pl.Expr]:
        ts, v = pl.col("_first_ts"), pl.col("first")  # the newer row wins only with an earlier time
        return [pl.when(ts.last() < ts.first()).then(v.last()).otherwise(v.first()), ts.min()]

    def result(self) -> pl.Expr:
        return pl.col("first")


class Last(Aggregator):
    """Value of the latest event (largest offset among equal times)."""

    name = "last"

    def initialize(self) -> list[pl.Expr]:
        return [pl.col("value").last().alias("last"), pl.col("ts").last().alias("_last_ts")]

    def add(self) -> list[pl.Expr]:
        ts, v = pl.col("_last_ts"), pl.col("last")  # the newer row wins at an equal or later time
        return [pl.when(ts.last() >= ts.first()).then(v.last()).otherwise(v.first()), ts.max()]

    def result(self) -> pl.Expr:
        return pl.col("last")


DEFAULT_AGGREGATORS: tuple[Aggregator, ...] = (Count(), First(), Last(), Min(), Max(), Mean(), Sum())
# the columns of a window table after ``series, window_start, window_end``, and the choices of window.target
AGGREGATE_NAMES: tuple[str, ...] = tuple(a.name for a in DEFAULT_AGGREGATORS)
