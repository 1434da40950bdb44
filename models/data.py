"""From history-store window tables to training samples, with array striding (no per-sample loops).

A window table has one row per (series, window_start) on a regular grid, with the
columns of :data:`pipeline.windows.WINDOW_SCHEMA` (``series, window_start,
window_end, count``, then the other aggregates).
Gap rows (``count = 0``) carry null aggregates. :func:`fill_gaps` is the one gap
rule every consumer of a context applies (training, the live job, backtests, the
pyfunc model). :func:`windows_to_matrix` turns the table into one ``(S, T)``
array on a shared time grid (NaN before a series starts), from which training
samples are drawn per batch (:mod:`models.train.sampling`), and :func:`time_split`
splits the time axis into train, validation and holdout target spans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from models.base import CALENDAR_CHANNELS, ModelConfig
from pipeline.errors import DatasetError, NotEnoughData

log = logging.getLogger("rollcast.data")

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS


@dataclass(frozen=True)
class SeriesMatrix:
    """Series on one regular grid: ``values (S, T)`` float32, ``window_end_ms (T,)``.

    ``values`` carry the last known value forward across gaps (NaN before a series' first value): they
    are the targets and actuals. ``known (S, T)`` says which windows had observations (None: all did);
    contexts are cut with :meth:`contexts`, which gives the gaps back as NaN for :func:`fill_gaps`.
    """

    series: list[str]
    values: np.ndarray
    window_end_ms: np.ndarray
    step_ms: int
    known: np.ndarray | None = None

    def slice(self, start: int, stop: int) -> SeriesMatrix:
        """The time steps ``[start, stop)``."""
        known = None if self.known is None else self.known[:, start:stop]
        return SeriesMatrix(self.series, self.values[:, start:stop], self.window_end_ms[start:stop], self.step_ms,
                            known)

    def rows(self, index: np.ndarray) -> SeriesMatrix:
        """The series at ``index`` (a copy of those rows only; all of them in order: this matrix)."""
        if len(index) == len(self.series) and np.array_equal(index, np.arange(len(self.series))):
            return self
        known = None if self.known is None else self.known[index]
        return SeriesMatrix([self.series[i] for i in index], self.values[index], self.window_end_ms, self.step_ms,
                            known)

    def contexts(self, start: int, stop: int) -> np.ndarray:
        """The raw context ``(S, stop - start)`` of every series: values, NaN where a window was a gap.

        A context reaching before a series' first window is all NaN: the live job has no such context
        either (too few windows), so it is not forecast on any path.
        """
        values = self.values[:, start:stop]
        if self.known is None:
            return values
        out = np.where(self.known[:, start:stop], values, np.nan)
        out[np.isnan(values).any(axis=1)] = np.nan
        return out


@dataclass(frozen=True)
class Samples:
    """Model inputs ``x (N, L, C)`` and targets ``y (N, H)``, float32."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class TimeSplit:
    """Target spans ``[start, stop)`` on the time axis."""

    train: tuple[int, int]
    val: tuple[int, int]
    holdout: tuple[int, int]


def ffill(values: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs along the last axis (leading NaNs stay NaN).

    >>> ffill(np.array([[np.nan, 1.0, np.nan, 3.0, np.nan]])).tolist()
    [[nan, 1.0, 1.0, 3.0, 3.0]]
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    gaps = np.isnan(values)
    if not gaps.any():  # the usual case: a copy, much cheaper than the fill
        return values.copy()
    idx = np.where(gaps, 0, np.arange(values.shape[-1]))
    np.maximum.accumulate(idx, axis=-1, out=idx)
    out = np.take_along_axis(values, idx, axis=-1)
    return out


def fill_gaps(context: np.ndarray) -> np.ndarray:
    """The gap rule, for every consumer of a context: a window with no observations (NaN) takes the last
    known value before it in the context; gaps before the context's first known value take that value.
    A context with no known value stays NaN: it is not forecast, and the caller counts it.

    The rule looks only at the context itself, so the same windows give the same forecast on every path.

    >>> fill_gaps(np.array([[np.nan, 1.0, np.nan, 3.0, np.nan], [np.nan] * 5])).tolist()
    [[1.0, 1.0, 1.0, 3.0, 3.0], [nan, nan, nan, nan, nan]]
    """
    out = ffill(context)
    lead = np.isnan(out)
    if lead.any():  # before the first known value: that value
        first = np.take_along_axis(out, np.argmax(~lead, axis=-1)[..., None], axis=-1)
        out = np.where(lead, first, out)
    return out


def known_any(context: np.ndarray) -> np.ndarray:
    """Which contexts ``(..., L)`` hold at least one known value (the others are not forecast)."""
    return ~np.isnan(context).all(axis=-1)


def windows_to_matrix(df: pl.DataFrame | pa.Table, target: str = "mean") -> SeriesMatrix:
    """Pivot a window table into a :class:`SeriesMatrix` of ``target``, gaps forward-filled."""
    if isinstance(df, pa.Table):
        df = pl.from_arrow(df)
    assert isinstance(df, pl.DataFrame)
    missing = [c for c in ("series", "window_start", "window_end", "count", target) if c not in df.columns]
    if missing:
        raise DatasetError(f"window table lacks column(s) {missing}; it has {df.columns}")
    if df.height == 0:
        raise NotEnoughData("the window table is empty")
    df = df.select(
        pl.col("series").cast(pl.Utf8),
        pl.col("window_start").cast(pl.Int64),
        pl.col("window_end").cast(pl.Int64),
        pl.when(pl.col("count") > 0).then(pl.col(target).cast(pl.Float64)).fill_nan(None).alias("y"),
    ).unique(subset=["series", "window_start"], keep="last")
    starts = np.unique(df["window_start"].to_numpy())
    step = int(np.diff(starts).min()) if len(starts) > 1 else int(
        (df["window_end"] - df["window_start"]).max()
    )
    if step <= 0:
        raise DatasetError("window_start values do not form a regular grid")
    t0 = int(starts[0])
    n_t = int((starts[-1] - t0) // step) + 1
    series = sorted(df["series"].unique().to_list())
    s_idx = df["series"].replace_strict({s: i for i, s in enumerate(series)}, return_dtype=pl.Int64).to_numpy()
    t_idx = (df["window_start"].to_numpy() - t0) // step
    values = np.full((len(series), n_t), np.nan, dtype=np.float32)
    values[s_idx, t_idx] = df["y"].to_numpy().astype(np.float32)
    length = int((df["window_end"] - df["window_start"]).median())
    ends = t0 + np.arange(n_t, dtype=np.int64) * step + length
    known = ~np.isnan(values)
    return SeriesMatrix(series, ffill(values), ends, step, None if known.all() else known)


def calendar_features(window_end_ms: np.ndarray) -> np.ndarray:
    """``(..., 4)`` sin/cos of hour of day and of day of week at each window end (UTC)."""
    t = np.asarray(window_end_ms, dtype=np.int64)
    day = 2 * np.pi * (t % DAY_MS) / DAY_MS
    week = 2 * np.pi * ((t + 3 * DAY_MS) % WEEK_MS) / WEEK_MS  # phase 0 on Monday 00:00 (epoch: Thursday)
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], axis=-1)


def make_inputs(values: np.ndarray, window_end_ms: np.ndarray | None, config: ModelConfig) -> np.ndarray:
    """Raw target context ``(B, L)`` (+ window ends ``(B, L)`` or ``(L,)``) -> model input ``(B, L, C)``."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 3:
        return values
    x = values[..., None]
    if not config.calendar:
        return x
    if window_end_ms is None:
        from pipeline.errors import ModelConfigError

        raise ModelConfigError("this model uses calendar features: pass the window end times of the context")
    cal = calendar_features(np.broadcast_to(np.asarray(window_end_ms), values.shape)).astype(np.float32)
    assert cal.shape[-1] == CALENDAR_CHANNELS
    return np.concatenate([x, cal], axis=-1)


def time_split(n_steps: int, context: int, horizon: int, val_fraction: float = 0.1, holdout: int = 0) -> TimeSplit:
    """Split ``[context, n_steps)`` target steps into train / validation / holdout spans by time."""
    usable = n_steps - context - holdout
    n_val = int(round(usable * val_fraction))
    if n_val and n_val < horizon:
        n_val = horizon
    if usable - n_val < horizon:
        raise NotEnoughData(
            f"{n_steps} steps are too few for context {context}, horizon {horizon}, holdout {holdout} "
            f"and a validation fraction of {val_fraction}; need at least {context + holdout + n_val + horizon}"
        )
    a = n_steps - holdout - n_val
    return TimeSplit(train=(context, a), val=(a, n_steps - holdout), holdout=(n_steps - holdout, n_steps))


def read_matrix(store: Any, start_ms: int, end_ms: int, target: str = "mean",
                batch_rows: int = 1 << 20, step_ms: int | None = None) -> tuple[SeriesMatrix, int, int]:
    """The windows of ``store`` with ``start_ms <= window_start < end_ms`` as a :class:`SeriesMatrix`, read in
    bounded memory; returns it with the number of rows read and the first window_start.

    Equal to ``windows_to_matrix(store.read(start_ms=start_ms, end_ms=end_ms), target)``, without the table.
    With ``step_ms`` (the store's window length: ingest writes epoch-aligned windows of
    ``window.length_ms``) the time grid is known, and one streamed pass over ``series, window_start, count,
    <target>`` scatters each batch straight into the matrix (:func:`_read_on_grid`); a store whose windows
    are not on that grid (a changed window length) is read as without it. Without ``step_ms`` a first pass
    over ``series, window_start, window_end`` finds the series and the grid, a second scatters. Memory:
    the matrix (plus a bool mask of the gaps, if any) and one batch. A window stored twice takes the
    value read last.
    """
    import pyarrow.compute as pc

    if step_ms:
        try:
            return _read_on_grid(store, start_ms, end_ms, target, batch_rows, int(step_ms))
        except _OffGrid as e:
            log.warning("the history store's windows are not on the grid of %d ms (%s): reading it twice", step_ms, e)

    names: set[str] = set()
    starts: set[int] = set()
    lengths: dict[int, int] = {}
    for batch in store.scan(["series", "window_start", "window_end"], start_ms, end_ms, batch_rows):
        names.update(pc.unique(batch.column("series")).to_pylist())
        ws = batch.column("window_start").to_numpy()
        starts.update(np.unique(ws).tolist())
        lens, counts = np.unique(batch.column("window_end").to_numpy() - ws, return_counts=True)
        for n, c in zip(lens.tolist(), counts.tolist(), strict=True):
            lengths[n] = lengths.get(n, 0) + c
    if not names:
        raise NotEnoughData("the window table is empty")
    grid = np.array(sorted(starts), dtype=np.int64)
    step = int(np.diff(grid).min()) if len(grid) > 1 else int(max(lengths))
    if step <= 0:
        raise DatasetError("window_start values do not form a regular grid")
    t0, n_t = int(grid[0]), int((grid[-1] - grid[0]) // step) + 1
    series = sorted(names)
    keys = pa.array(series, pa.string())
    values = np.full((len(series), n_t), np.nan, dtype=np.float32)
    known = np.zeros((len(series), n_t), dtype=bool)
    rows = 0
    for batch in store.scan(["series", "window_start", "count", target], start_ms, end_ms, batch_rows):
        s_idx = pc.index_in(batch.column("series").cast(pa.string()), value_set=keys).to_numpy()
        t_idx = (batch.column("window_start").to_numpy() - t0) // step
        y = batch.column(target).cast(pa.float64()).to_numpy(zero_copy_only=False)
        y = np.where(batch.column("count").to_numpy(zero_copy_only=False) > 0, y, np.nan)  # a gap: no value
        values[s_idx, t_idx] = y
        known[s_idx, t_idx] = ~np.isnan(y)
        rows += batch.num_rows
    ends = t0 + np.arange(n_t, dtype=np.int64) * step + _median_length(lengths)
    return SeriesMatrix(series, values, ends, step, _fill_forward(values, known)), rows, t0


def _fill_forward(values: np.ndarray, known: np.ndarray) -> np.ndarray | None:
    """Forward-fill, in place, the rows of ``values`` with a window not ``known``, in row chunks (ffill's
    index array stays small); the mask for :class:`SeriesMatrix`: ``known``, or None when all are."""
    gappy = np.flatnonzero(~known.all(axis=1))
    chunk = max(1, (1 << 24) // max(values.shape[1], 1))
    for a in range(0, len(gappy), chunk):
        rows = gappy[a : a + chunk]
        values[rows] = ffill(values[rows])
    return None if len(gappy) == 0 else known


class _OffGrid(Exception):
    """A window_start not on the expected grid."""


def _read_on_grid(store: Any, start_ms: int, end_ms: int, target: str, batch_rows: int,
                  step: int) -> tuple[SeriesMatrix, int, int]:
    """:func:`read_matrix` in one pass, on the grid of epoch-aligned windows of ``step`` ms.

    Rows are allocated for the number of series the newest day holds (``store.newest_day_series``,
    one day's ``series`` column), grown if more come. ``series`` is read as Parquet's dictionary and each
    distinct dictionary is mapped to row numbers once (a store's files of one source partition share
    them), so a file costs a look-up, not one per name or row, and its rows are scattered into the
    NaN-filled matrix by flat index. At the end the rows are put in name order and the columns trimmed
    to the windows read, in place: no second copy of the matrix is made.
    """
    origin = -(-int(start_ms) // step) * step  # the first window_start >= start_ms
    n_t = max(0, -(-(int(end_ms) - origin) // step))
    cap = max(64, int(store.newest_day_series() * 1.05) + 16)
    values = np.full((cap, n_t), np.nan, dtype=np.float32)
    ids: dict[str, int] = {}
    names: list[str] = []
    maps: dict[tuple, np.ndarray] = {}  # dictionary content -> row of each of its names
    rows, t_lo, t_hi = 0, n_t, -1
    flat = values.reshape(-1)

    def row_index(dictionary: pa.Array, codes: np.ndarray) -> np.ndarray:
        key = (dictionary.offset, len(dictionary), *(b.to_pybytes() for b in dictionary.buffers()[1:] if b is not None))
        index = maps.get(key)
        if index is None:
            used = np.bincount(codes, minlength=len(dictionary)) > 0  # the filter may leave a name no row
            index = np.full(len(dictionary), -1, dtype=np.int64)
            for j, name in enumerate(dictionary.to_pylist()):
                if name not in ids and used[j]:
                    ids[name] = len(names)
                    names.append(name)
                index[j] = ids.get(name, -1)
            if (index < 0).any():  # a name without rows here may have rows in the next file: no caching
                return index
            if len(maps) >= 4096:
                maps.clear()
            maps[key] = index
        return index

    cols = ["series", "window_start", "count", target]
    for batch in store.scan(cols, start_ms, end_ms, batch_rows, dictionary_series=True):
        col = batch.column("series")
        if not pa.types.is_dictionary(col.type):
            col = col.dictionary_encode()
        codes = col.indices.to_numpy(zero_copy_only=False)
        s_idx = row_index(col.dictionary, codes)[codes]
        if len(names) > cap:  # more series than the newest day has: grow (a copy, the rare case)
            new_cap = max(len(names), int(cap * 1.5))
            values = np.concatenate([values, np.full((new_cap - cap, n_t), np.nan, dtype=np.float32)])
            flat, cap = values.reshape(-1), new_cap
        t_idx, off_grid = np.divmod(batch.column("window_start").to_numpy() - origin, step)
        if off_grid.any():
            raise _OffGrid(f"window_start {int(origin + (t_idx * step + off_grid)[off_grid != 0][0])}")
        y = batch.column(target).to_numpy(zero_copy_only=False).astype(np.float32)
        y[batch.column("count").to_numpy(zero_copy_only=False) <= 0] = np.nan  # a gap: no value
        s_idx *= n_t
        s_idx += t_idx
        flat[s_idx] = y
        rows += batch.num_rows
        t_lo, t_hi = min(t_lo, int(t_idx.min())), max(t_hi, int(t_idx.max()))
    n = len(names)
    if n == 0:
        raise NotEnoughData("the window table is empty")
    values = values[:n]
    w = t_hi - t_lo + 1
    if w != n_t:  # the columns read, packed at the start of the same buffer
        values = _pack_columns(values, t_lo, w)
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    if not np.array_equal(order, np.arange(n)):
        _permute_rows(values, order)
        names = [names[i] for i in order]
    known = ~np.isnan(values)  # windows with a value: not a gap, not missing
    t0 = origin + t_lo * step
    ends = t0 + np.arange(w, dtype=np.int64) * step + step
    return SeriesMatrix(names, values, ends, step, _fill_forward(values, known)), rows, t0


def _pack_columns(a: np.ndarray, start: int, width: int) -> np.ndarray:
    """``a[:, start:start + width]`` as a C-contiguous array in ``a``'s own buffer (rows moved in order:
    row i's destination never reaches a later row's source)."""
    n = a.shape[0]
    flat = a.reshape(-1)
    for i in range(n):
        flat[i * width : (i + 1) * width] = a[i, start : start + width].copy()
    return flat[: n * width].reshape(n, width)


def _permute_rows(a: np.ndarray, order: np.ndarray) -> None:
    """``a[:] = a[order]`` in place, one row of scratch (cycle by cycle)."""
    done = np.zeros(len(order), dtype=bool)
    tmp = np.empty(a.shape[1:], dtype=a.dtype)
    for i in range(len(order)):
        if done[i]:
            continue
        done[i] = True
        if order[i] == i:
            continue
        tmp[...] = a[i]
        j = i
        while True:
            k = int(order[j])
            done[j] = True
            if k == i:
                a[j] = tmp
                break
            a[j] = a[k]
            j = k


def _median_length(counts: dict[int, int]) -> int:
    """The median of window lengths given as ``{length: count}`` (as :func:`windows_to_matrix` takes it)."""
    lens = np.array(sorted(counts), dtype=np.int64)
    cum = np.cumsum([counts[n] for n in lens])
    total = int(cum[-1])
    lo = lens[np.searchsorted(cum, (total - 1) // 2, side="right")]
    hi = lens[np.searchsorted(cum, total // 2, side="right")]
    return int((lo + hi) // 2)


def first_values(values: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
    """``(S,)`` index of each series' first value (``T`` for a series with none): ``values`` carry values
    forward, so only the steps before a series' first window are NaN."""
    out = np.empty(values.shape[0], dtype=np.int64)
    for a in range(0, values.shape[0], chunk_rows):
        out[a : a + chunk_rows] = np.isnan(values[a : a + chunk_rows]).sum(axis=1)
    return out
