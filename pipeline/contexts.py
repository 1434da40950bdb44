"""The recent windows of every series, held in memory as the contexts a forecast needs, and their
backfill from the history store.

:class:`ContextBuffers` keeps one ring buffer per series in a 2-D array and gathers the contexts of a
whole batch of windows at once; :func:`contexts_from_store` fills them on start-up and
:func:`buffer_from_store` supplies contexts older than the buffers (a lagging batch after a restart).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.store import HistoryStore


class ContextBuffers:
    """The most recent windows of every series, as one ring buffer per series in a 2-D array.

    Windows are aligned to the epoch, so window ``k`` of a series (``k = window_end // step_ms``)
    lives in slot ``k % capacity`` of the series' row, and ``window[row, slot]`` records which
    window is there. A context of ``L`` windows ending at ``k`` exists exactly when the ``L`` slots
    before it hold windows ``k - L + 1 .. k``: one vectorised gather and comparison for a whole
    batch of series (a per-series Python buffer cost far more at thousands of series). A window
    older than the one in its slot is not stored (it is beyond the last ``capacity`` windows); a
    repeat (same window, after a restart) replaces the value; a window whose end is not a multiple
    of ``step_ms`` (another window length) is neither stored nor given a context.
    """

    def __init__(self, capacity: int, step_ms: int):
        self.capacity = capacity
        self.step_ms = step_ms
        self.rows: dict[str, int] = {}
        self.values = np.full((0, capacity), np.nan)
        self.window = np.full((0, capacity), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def row_of(self, series: list[str]) -> np.ndarray:
        """Rows of ``series``, adding rows for new ones."""
        rows = self.rows
        out = np.empty(len(series), dtype=np.int64)
        for i, s in enumerate(series):
            r = rows.get(s)
            if r is None:
                r = rows[s] = len(rows)
            out[i] = r
        if len(rows) > len(self.values):
            grow = max(len(rows), 2 * len(self.values), 64) - len(self.values)
            self.values = np.vstack([self.values, np.full((grow, self.capacity), np.nan)])
            self.window = np.vstack([self.window, np.full((grow, self.capacity), -1, dtype=np.int64)])
        return out

    def put(self, series: list[str], ends: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Store windows (``ends`` in ms); return their rows."""
        rows = self.row_of(series)
        k = np.asarray(ends, dtype=np.int64) // self.step_ms
        order = np.argsort(k, kind="stable")  # within a batch the newest write to a slot wins
        r, k, v = rows[order], k[order], np.asarray(values, dtype=np.float64)[order]
        slot = k % self.capacity
        aligned = np.asarray(ends, dtype=np.int64)[order] % self.step_ms == 0  # else another window length
        keep = (k >= self.window[r, slot]) & aligned
        self.window[r[keep], slot[keep]] = k[keep]
        self.values[r[keep], slot[keep]] = v[keep]
        return rows

    def contexts(self, rows: np.ndarray, ends: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Contexts ``(B, length)`` of the windows ending at ``ends`` for ``rows``, and two masks:
        ``ok`` (all ``length`` windows held) and ``evicted`` (some were replaced by newer ones:
        older than the buffer, e.g. a lagging batch after a restart)."""
        k = np.asarray(ends, dtype=np.int64) // self.step_ms
        back = np.arange(length - 1, -1, -1)
        want = k[:, None] - back  # (B, L) window numbers
        # their slots, want % capacity, with one modulo per row (a modulo per element is slower), and one
        # flat gather per array (2-D fancy indexing is slower too); figures in BENCHMARKS.md
        slots = (k % self.capacity)[:, None] - back
        if length <= self.capacity:
            slots += self.capacity * (slots < 0)
        else:
            slots %= self.capacity
        flat = slots + (np.asarray(rows, dtype=np.int64) * self.capacity)[:, None]
        held = np.take(self.window, flat)
        ok = (held == want).all(axis=1) & (np.asarray(ends) % self.step_ms == 0)
        evicted = ~ok & (held > want).any(axis=1)
        return np.take(self.values, flat), ok, evicted


def target_values(table: pa.Table, target: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Series, window ends and target values of a windows table; NaN where a window is a gap
    (``count = 0``), except for the ``count`` target itself."""
    values = table.column(target).to_numpy(zero_copy_only=False).astype(np.float64)
    if target != "count":
        values = np.where(table.column("count").to_numpy(zero_copy_only=False) > 0, values, np.nan)
    ends = table.column("window_end").to_numpy(zero_copy_only=False).astype(np.int64)
    return table.column("series").to_pylist(), ends, values


def windows_of(tables: Sequence[pa.Table], wanted: Iterable[str],
                target: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{series: (window ends, target values)} of the ``wanted`` series in the windows ``tables``."""
    if not tables:
        return {}
    added = [target_values(table, target) for table in tables]
    frame = pl.DataFrame({
        "series": pl.Series([s for names, _, _ in added for s in names], dtype=pl.String),
        "end": np.concatenate([e for _, e, _ in added]),
        "value": np.concatenate([v for _, _, v in added]),
    }).filter(pl.col("series").is_in(list(wanted)))
    return {s: (part["end"].to_numpy(), part["value"].to_numpy())
            for (s,), part in frame.partition_by("series", as_dict=True).items()}


def contexts_from_store(store: HistoryStore, capacity: int, step_ms: int, target: str) -> ContextBuffers:
    """Buffers of ``capacity`` windows per series holding the last windows of every series in ``store``."""
    buffers = ContextBuffers(capacity, step_ms)
    buffers.put(*target_values(store.last_windows(capacity).to_arrow(), target))
    return buffers


def buffer_from_store(store: HistoryStore, series: str, first_end: int, last_end: int, length: int, step_ms: int,
                      target: str, own: tuple[np.ndarray, np.ndarray] | None = None) -> ContextBuffers:
    """The windows of ``series`` that supply the contexts of windows ending in [first_end, last_end]
    (older than the in-memory buffer): those in the history store, then ``own`` (window ends and
    values of the batch's own windows, which the store may not hold yet)."""
    lo = first_end - length * step_ms
    frame = store.read(series=series, start_ms=lo, end_ms=last_end)
    buf = ContextBuffers((last_end - first_end) // step_ms + length + 1, step_ms)
    buf.put(*target_values(frame.to_arrow(), target))
    if own is not None:
        window_ends, values = own
        mine = (window_ends > lo) & (window_ends <= last_end)  # others would wrap around this buffer
        buf.put([series] * int(mine.sum()), window_ends[mine], values[mine])
    return buf
