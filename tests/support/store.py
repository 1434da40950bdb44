"""Helpers of the history-store tests: window frames and a checkpoint that crashes in its moves."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline.store import HistoryStore, Progress
from pipeline.windows import WINDOW_SCHEMA

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 19_675 * DAY  # 2023-11-14T00:00Z


def windows(series: list[str], starts: list[int]) -> pl.DataFrame:
    """Hourly windows whose values are derived from (series, start), so every row is distinct."""
    rows = []
    for s in series:
        for t in starts:
            v = float(t // HOUR % 1000) + ord(s[0])
            rows.append((s, t, t + HOUR, 3, v, v + 1, v - 1, v + 2, v + 0.5, 3 * v + 1.5))
    return pl.DataFrame(rows, schema=WINDOW_SCHEMA, orient="row")


def crash_while_moving(
    store: HistoryStore,
    topic: str,
    partition: int,
    frame: pl.DataFrame,
    progress: Progress,
    monkeypatch: pytest.MonkeyPatch,
    copied: int = 0,
) -> None:
    """Write a checkpoint whose process dies after the commit point (the progress record), while
    moving staged files: the first ``copied`` files are copied to the dataset but not yet deleted
    from staging (an object store's move is copy, then delete)."""

    def crash(moves: list[tuple[str, str]]) -> None:
        for staged, final in moves[:copied]:
            store.fs.copy_file(f"{store.root}/{staged}", f"{store.root}/{final}")
        raise OSError("killed while moving staged files")

    with monkeypatch.context() as m:
        m.setattr(store, "_apply_moves", crash)
        with pytest.raises(OSError, match="killed"):
            store.write_checkpoint(topic, partition, frame, progress)
