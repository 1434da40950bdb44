"""The history store: closed windows as a Parquet dataset, partitioned by day.

Layout under ``settings.history_dir`` (a local directory)::

    day=2024-01-01/<checkpoint-id>-<topic>-<partition>.parquet   closed windows
    _progress/<topic>-<partition>.json                            commit point per partition
    _pending/<topic>-<partition>/<checkpoint-id>/...              files being written

Readers (train, forecast, backtest) use :class:`HistoryStore`::

    store = HistoryStore(settings)            # or HistoryStore("/path/to/history")
    df = store.read(series=["a"], start_ms=t0, end_ms=t1)   # sorted by (series, window_start)
    recent = store.last_windows(96)           # the last 96 windows of every series
    store.count(), store.max_window_end()     # rows; {series: end of its last window}

Writes are exactly-once across crashes: :meth:`HistoryStore.write_checkpoint`
stages the files, then atomically replaces the partition's progress record
(the commit point: position in the source partition, max event time, staged
files), then moves the staged files into the dataset. :meth:`HistoryStore.recover`
finishes a move a crash interrupted and discards staging no record names.
Directories starting with ``_`` are invisible to Parquet dataset readers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.config import Settings
from pipeline.windows import WINDOW_SCHEMA

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Progress:
    """What a partition's last checkpoint made durable.

    ``position``: next source offset after the last processed record;
    ``max_ts``: max event time seen (the watermark plus the allowed lateness).
    """

    position: int
    max_ts: int | None


class HistoryStore:
    """Read and write the windows history (see the module docstring)."""

    def __init__(self, target: Settings | str | Path):
        self.root = Path(target.history_dir if isinstance(target, Settings) else target)

    # -- reading ----------------------------------------------------------------------------

    def read(
        self,
        series: str | list[str] | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> pl.DataFrame:
        """Windows with ``start_ms <= window_start < end_ms`` (either bound optional), sorted by
        (series, window_start). Only the day directories in range are opened."""
        files = self._files(start_ms, end_ms)
        if not files:
            return pl.DataFrame(schema=WINDOW_SCHEMA)
        dataset = ds.dataset(files, format="parquet")
        flt = None
        if series is not None:
            names = [series] if isinstance(series, str) else list(series)
            flt = ds.field("series").isin(names)
        if start_ms is not None:
            f = ds.field("window_start") >= start_ms
            flt = f if flt is None else flt & f
        if end_ms is not None:
            f = ds.field("window_start") < end_ms
            flt = f if flt is None else flt & f
        table = dataset.to_table(columns=list(WINDOW_SCHEMA), filter=flt)
        return pl.from_arrow(table).cast(WINDOW_SCHEMA).sort("series", "window_start")

    def last_windows(self, n: int, series: str | list[str] | None = None) -> pl.DataFrame:
        """The last ``n`` windows of each series, sorted by (series, window_start)."""
        return self.read(series).group_by("series", maintain_order=True).tail(n)

    def count(self) -> int:
        """Number of windows stored."""
        files = self._files(None, None)
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    def max_window_end(self) -> dict[str, int]:
        """End of the last stored window of every series."""
        files = self._files(None, None)
        if not files:
            return {}
        table = ds.dataset(files, format="parquet").to_table(columns=["series", "window_end"])
        ends = pl.from_arrow(table).group_by("series").agg(pl.col("window_end").max())
        return dict(zip(ends["series"].to_list(), ends["window_end"].to_list(), strict=True))

    def _files(self, start_ms: int | None, end_ms: int | None) -> list[str]:
        if not self.root.is_dir():
            return []
        lo = _day(start_ms) if start_ms is not None else ""
        hi = _day(end_ms - 1) if end_ms is not None else "~"
        out = []
        for d in sorted(self.root.glob("day=*")):
            if lo <= d.name[4:] <= hi:
                out.extend(str(p) for p in sorted(d.glob("*.parquet")))
        return out

    # -- writing (the ingest checkpoint) ----------------------------------------------------

    def write_checkpoint(self, topic: str, partition: int, windows: pl.DataFrame, progress: Progress) -> None:
        """Make ``windows`` and ``progress`` of one source partition durable, exactly once."""
        name = f"{topic}-{partition}"
        ckpt = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        stage = self.root / "_pending" / name / ckpt
        moves: list[tuple[str, str]] = []
        if windows.height:
            stage.mkdir(parents=True, exist_ok=True)
            days = windows.with_columns(_day=(pl.col("window_start") // DAY_MS))
            for (day,), part in days.group_by("_day", maintain_order=True):
                label = _day(int(day) * DAY_MS)
                staged = stage / f"day={label}.parquet"
                _write_parquet(part.drop("_day").sort("series", "window_start"), staged)
                final = self.root / f"day={label}" / f"{ckpt}-{name}.parquet"
                moves.append((str(staged.relative_to(self.root)), str(final.relative_to(self.root))))
        record = {"position": progress.position, "max_ts": progress.max_ts, "checkpoint": ckpt, "moves": moves}
        _write_atomic(self.root / "_progress" / f"{name}.json", json.dumps(record).encode())
        self._apply_moves(moves)
        shutil.rmtree(stage, ignore_errors=True)

    def recover(self, topic: str, partition: int) -> Progress | None:
        """Finish or discard what a crash interrupted; return the partition's last progress."""
        name = f"{topic}-{partition}"
        path = self.root / "_progress" / f"{name}.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            record = None
        if record is not None:
            self._apply_moves([tuple(m) for m in record["moves"]])
        shutil.rmtree(self.root / "_pending" / name, ignore_errors=True)
        if record is None:
            return None
        return Progress(position=int(record["position"]), max_ts=record["max_ts"])

    def _apply_moves(self, moves: list[tuple[str, str]]) -> None:
        for staged, final in moves:
            src, dst = self.root / staged, self.root / final
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                _fsync_dir(dst.parent)


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms // 1000)) if ms >= 0 else "0000-00-00"


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(df.to_arrow(), tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
