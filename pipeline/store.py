"""The history store: closed windows as a Parquet dataset, partitioned by day.

The store lives at ``settings.history_location``: a local directory (default
``<data_dir>/history``) or any URI :func:`pyarrow.fs.FileSystem.from_uri`
understands (setting ``storage.history``), e.g.
``s3://bucket/prefix?endpoint_override=minio:9000&scheme=http`` or
``gs://bucket/prefix``. Every access goes through :mod:`pyarrow.fs`. Layout::

    day=2024-01-01/<checkpoint-id>-<topic>-<partition>.parquet   closed windows
    _progress/<topic>-<partition>.json                            commit point per partition
    _state/<name>                                                 a job's state (forecast: scoring)
    _pending/<topic>-<partition>/<checkpoint-id>/...              files being written

Readers (train, forecast, backtest) use :class:`HistoryStore`::

    store = HistoryStore(settings)            # or HistoryStore("/path") / HistoryStore("s3://bucket/h")
    df = store.read(series=["a"], start_ms=t0, end_ms=t1)   # sorted by (series, window_start)
    recent = store.last_windows(96)           # the last 96 windows of every series
    store.count(), store.max_window_end()     # rows; {series: end of its last window}

Writes are exactly-once across crashes. :meth:`HistoryStore.write_checkpoint`

1. writes the windows to staging files under ``_pending/`` (no reader looks
   there: readers open only ``day=*/``, and names starting with ``_`` are
   invisible to Parquet dataset readers);
2. atomically replaces the partition's progress record: its position in the
   source partition, its max event time, and the moves from staging to the
   dataset. This is the commit point: a crash before it leaves the old record,
   whose position makes the restart redo this checkpoint, and staging no
   record names, which :meth:`HistoryStore.recover` deletes;
3. moves the staged files to ``day=*/``. :meth:`HistoryStore.recover` repeats
   every move of the record whose source still exists, so a crash during the
   moves ends with each file moved exactly once. Destination names are unique
   to the checkpoint, so a repeated move can only write the same file again.

What makes steps 2 and 3 atomic and durable depends on the filesystem:

- *Local*: staged files and the record are written to a temporary name,
  fsynced and renamed over the final name (``os.replace``, atomic), and the
  directory is fsynced (so are the parents of directories created on the
  way), so everything the record names survives a power loss with it; a
  move is a rename, so a file is either still staged or in the dataset,
  never in both or neither.
- *Object stores* (S3, GCS, Azure): a single-object PUT is atomic (readers see
  the old object or the new one, never a part) and durable when it returns,
  so the record is written in place. A move is copy then delete, not atomic:
  a crash between the two leaves the file in both places. The copy in staging
  is invisible to readers, and ``recover`` copies it again over the same
  destination (same bytes) and then deletes it, so the dataset still holds it
  once. Listing is strongly consistent on S3, GCS and Azure, so a reader sees
  a moved file as soon as the move returns.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import Settings, running_stack
from pipeline.errors import ConfigError, StoreUnavailable
from pipeline.windows import WINDOW_SCHEMA

log = logging.getLogger("rollcast.store")

DAY_MS = 86_400_000
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _io(doing: str) -> Callable[[_Method], _Method]:
    """Raise an I/O error of the decorated method (``OSError``: pyarrow's S3, GCS and local errors) as
    :class:`StoreUnavailable`, naming the store and what it was doing; other errors pass unchanged."""

    def wrap(method: _Method) -> _Method:
        @functools.wraps(method)
        def run(self: HistoryStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except OSError as e:
                raise StoreUnavailable(f"history store {self.location}: {doing} failed: {e}") from e

        return cast(_Method, run)

    return wrap


@dataclass(frozen=True)
class Progress:
    """What a partition's last checkpoint made durable.

    ``position``: next source offset after the last processed record;
    ``max_ts``: max event time seen (the watermark plus the allowed lateness);
    ``safe``: the offset committed with this checkpoint (``position``, or the earliest event of a
    window still open), where a new assignment of the partition resumes reading; None in records
    written before it was kept.
    """

    position: int
    max_ts: int | None
    safe: int | None = None


class HistoryStore:
    """Read and write the windows history (see the module docstring).

    ``target`` is the settings (``settings.history_location``), a local path, or a
    filesystem URI. ``location`` names the store in messages (credentials removed);
    ``root`` is its path inside ``fs``.
    """

    def __init__(self, target: Settings | str | Path):
        location = target.history_location if isinstance(target, Settings) else str(target)
        self.location = redact_location(location)
        self.fs, self.root = open_location(location)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- reading ----------------------------------------------------------------------------

    @_io("reading windows")
    def read(
        self,
        series: str | list[str] | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> pl.DataFrame:
        """Windows with ``start_ms <= window_start < end_ms`` (either bound optional), sorted by
        (series, window_start). Only the day directories in range are opened."""
        return self._read_files(self._files(start_ms, end_ms), series, start_ms, end_ms)

    def _read_files(self, files: list[str], series: str | list[str] | None = None, start_ms: int | None = None,
                    end_ms: int | None = None) -> pl.DataFrame:
        """:meth:`read` over the Parquet ``files`` (those of the day directories in range)."""
        if not files:
            return pl.DataFrame(schema=WINDOW_SCHEMA)
        dataset = ds.dataset(files, filesystem=self.fs, format="parquet")
        flt = _series_filter(series)
        if start_ms is not None:
            f = ds.field("window_start") >= start_ms
            flt = f if flt is None else flt & f
        if end_ms is not None:
            f = ds.field("window_start") < end_ms
            flt = f if flt is None else flt & f
        table = dataset.to_table(columns=list(WINDOW_SCHEMA), filter=flt)
        return pl.from_arrow(table).cast(WINDOW_SCHEMA).sort("series", "window_start")

    def scan(self, columns: list[str], start_ms: int | None = None, end_ms: int | None = None,
             batch_size: int = 1 << 20, dictionary_series: bool = False) -> Iterator[pa.RecordBatch]:
        """Stream ``columns`` of the windows with ``start_ms <= window_start < end_ms`` as record batches of
        at most ``batch_size`` rows, in file order (unsorted): memory follows one batch, not the span.
        For readers that build their own arrays (the train job's series matrix). ``dictionary_series``:
        ``series`` comes as a dictionary array, as Parquet stores it (no string per row is built)."""
        flt = None
        if start_ms is not None:
            flt = ds.field("window_start") >= start_ms
        if end_ms is not None:
            f = ds.field("window_start") < end_ms
            flt = f if flt is None else flt & f
        try:
            files = self._files(start_ms, end_ms)
            if not files:
                return
            fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=["series"])) \
                if dictionary_series else "parquet"
            dataset = ds.dataset(files, filesystem=self.fs, format=fmt)
            for batch in dataset.to_batches(columns=columns, filter=flt, batch_size=batch_size):
                if batch.num_rows:
                    yield batch
        except OSError as e:
            raise StoreUnavailable(f"history store {self.location}: reading windows failed: {e}") from e

    @_io("reading the last windows")
    def last_windows(self, n: int, series: str | list[str] | None = None) -> pl.DataFrame:
        """The last ``n`` windows of each series, sorted by (series, window_start).

        Memory follows the result, not the history: one pass over two columns counts the windows of
        every series, then the day directories are read newest first, each for the series still
        short of their windows, until every series has its ``min(n, windows)``. Both passes read the
        files listed once, at the start: ingest may add files meanwhile, and a count taken before they
        came, applied to the windows after, would leave out the oldest of the last ``n`` (a hole in a
        forecast job's contexts).
        """
        files = self._files(None, None)
        stats = self._series_stats(series, files)
        need = stats.select("series", pl.min_horizontal(pl.col("windows"), n).cast(pl.Int64).alias("need"))
        need = need.filter(pl.col("need") > 0)
        by_day: dict[str, list[str]] = {}
        for path in files:  # a day directory's files, as listed
            by_day.setdefault(path.rsplit("/", 1)[0], []).append(path)
        frames = []
        for day in sorted(by_day, reverse=True):
            if need.height == 0:
                break
            day_windows = self._read_files(by_day[day], need["series"].to_list())
            if day_windows.height == 0:
                continue
            got = (day_windows.join(need, on="series")
                   .filter(pl.int_range(pl.len()).reverse().over("series") < pl.col("need")))
            frames.append(got.drop("need"))
            taken = got.group_by("series").agg(pl.len().alias("taken"))
            need = (need.join(taken, on="series", how="left")
                    .select("series", (pl.col("need") - pl.col("taken").fill_null(0)).alias("need"))
                    .filter(pl.col("need") > 0))
        if not frames:
            return pl.DataFrame(schema=WINDOW_SCHEMA)
        return pl.concat(frames).sort("series", "window_start")

    @_io("counting windows")
    def count(self, after_ms: int | None = None) -> int:
        """Number of windows stored; with ``after_ms``, of those that end after it."""
        files = self._files(None, None)
        if not files:
            return 0
        flt = None if after_ms is None else ds.field("window_end") > after_ms
        return ds.dataset(files, filesystem=self.fs, format="parquet").count_rows(filter=flt)

    def counter(self) -> Callable[[], int]:
        """A function that returns :meth:`count`, reading the Parquet footer of each file only the first time
        it sees the file (a file never changes once moved into the dataset): a call costs one listing of the
        day directories plus the new files, not a read of every file. For callers that count again and again
        (the train job's ``after_windows`` schedule)."""
        return functools.partial(self._count_new, {})

    @_io("counting windows")
    def _count_new(self, rows: dict[str, int]) -> int:
        files = self._files(None, None)
        for path in files:
            if path not in rows:
                rows[path] = pq.read_metadata(path, filesystem=self.fs).num_rows
        return sum(rows[path] for path in files)

    @_io("reading the newest window's end")
    def last_window_end(self) -> int | None:
        """End of the newest stored window of any series (None: the store is empty), from the Parquet footers
        of the newest day directory's files (their statistics; a file without them is read)."""
        for day in reversed(self._days(None, None)):
            ends = [self._max_window_end_of(path) for path in self._day_files(day)]
            ends = [e for e in ends if e is not None]
            if ends:
                return max(ends)
        return None

    def _max_window_end_of(self, path: str) -> int | None:
        meta = pq.read_metadata(path, filesystem=self.fs)
        col = meta.schema.to_arrow_schema().get_field_index("window_end")
        out = None
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if rg.num_rows == 0:
                continue
            st = rg.column(col).statistics
            if st is None or not st.has_min_max:  # no statistics: read the column
                ends = pq.read_table(path, columns=["window_end"], filesystem=self.fs).column(0)
                m = pc.max(ends).as_py()
                return None if m is None else int(m)
            out = int(st.max) if out is None else max(out, int(st.max))
        return out

    @_io("counting the newest day's series")
    def newest_day_series(self) -> int:
        """The number of series with a window in the newest day directory (0: none): a cheap estimate of
        the number of series, from one day's ``series`` column."""
        days = self._days(None, None)
        if not days:
            return 0
        files = self._day_files(days[-1])
        if not files:
            return 0
        col = ds.dataset(files, filesystem=self.fs, format="parquet").to_table(columns=["series"]).column(0)
        return len(pc.unique(col))

    @_io("reading the series' last windows")
    def max_window_end(self) -> dict[str, int]:
        """End of the last stored window of every series."""
        stats = self._series_stats()
        return dict(zip(stats["series"].to_list(), stats["last_end"].to_list(), strict=True))

    def _series_stats(self, series: str | list[str] | None = None, files: list[str] | None = None) -> pl.DataFrame:
        """``series, windows, last_end`` of every stored series (or of ``series``), from one streamed
        pass over two columns of ``files`` (default: every file now): memory follows the number of
        series, not of windows."""
        stats = pl.DataFrame(schema={"series": pl.String, "windows": pl.Int64, "last_end": pl.Int64})
        files = self._files(None, None) if files is None else files
        if not files:
            return stats
        parts = [stats]
        for batch in ds.dataset(files, filesystem=self.fs, format="parquet").to_batches(
                columns=["series", "window_end"], filter=_series_filter(series), batch_size=1 << 20):
            if batch.num_rows:
                parts.append(pl.from_arrow(batch).group_by("series").agg(
                    pl.len().cast(pl.Int64).alias("windows"),
                    pl.col("window_end").max().cast(pl.Int64).alias("last_end")))
            if len(parts) >= 64:
                parts = [_merge_stats(parts)]
        return _merge_stats(parts)

    def _days(self, start_ms: int | None, end_ms: int | None) -> list[str]:
        """Day directories, oldest first, that may hold windows in [start_ms, end_ms)."""
        lo = _day(start_ms) if start_ms is not None else ""
        hi = _day(end_ms - 1) if end_ms is not None else "~"
        return sorted(
            info.path
            for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
            if info.type == pafs.FileType.Directory
            and info.base_name.startswith("day=")
            and lo <= info.base_name[4:] <= hi
        )

    def _day_files(self, day: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(day, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def _files(self, start_ms: int | None, end_ms: int | None) -> list[str]:
        """Parquet files of the day directories that may hold windows in [start_ms, end_ms)."""
        return [f for day in self._days(start_ms, end_ms) for f in self._day_files(day)]

    # -- writing (the ingest checkpoint) ----------------------------------------------------

    @_io("writing a checkpoint")
    def write_checkpoint(self, topic: str, partition: int, windows: pl.DataFrame, progress: Progress) -> None:
        """Make ``windows`` and ``progress`` of one source partition durable, exactly once."""
        name = f"{topic}-{partition}"
        ckpt = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        stage = f"_pending/{name}/{ckpt}"
        moves: list[tuple[str, str]] = []
        if windows.height:
            days = windows.with_columns(_day=(pl.col("window_start") // DAY_MS))
            for (day,), part in days.group_by("_day", maintain_order=True):
                label = _day(int(day) * DAY_MS)
                staged = f"{stage}/day={label}.parquet"
                self._put_parquet(part.drop("_day").sort("series", "window_start").to_arrow(), staged)
                moves.append((staged, f"day={label}/{ckpt}-{name}.parquet"))
        record = {
            "position": progress.position,
            "max_ts": progress.max_ts,
            "safe": progress.safe,
            "checkpoint": ckpt,
            "moves": moves,
        }
        self._put_record(f"_progress/{name}.json", json.dumps(record).encode())  # the commit point
        self._apply_moves(moves)
        if moves:
            self._remove_dir(stage)

    @_io("recovering a checkpoint")
    def recover(self, topic: str, partition: int) -> Progress | None:
        """Finish or discard what a crash interrupted; return the partition's last progress."""
        name = f"{topic}-{partition}"
        try:
            with self.fs.open_input_stream(self._path(f"_progress/{name}.json")) as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            record = None
        if record is not None:
            self._apply_moves([tuple(m) for m in record["moves"]])
        self._remove_dir(f"_pending/{name}")
        if record is None:
            return None
        safe = record.get("safe")
        return Progress(position=int(record["position"]), max_ts=record["max_ts"],
                        safe=None if safe is None else int(safe))

    @_io("writing a job's state")
    def write_state(self, name: str, data: bytes) -> None:
        """Replace ``_state/<name>`` atomically (a job's state beside the windows, e.g. the forecast job's
        scoring and calibration state per windows partition); durable when this returns."""
        self._put_record(f"_state/{name}", data)

    @_io("reading a job's state")
    def read_state(self, name: str) -> bytes | None:
        """What :meth:`write_state` last wrote under ``name``, or None."""
        try:
            with self.fs.open_input_stream(self._path(f"_state/{name}")) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _put_parquet(self, table: pa.Table, rel: str) -> None:
        """Write a staged file, durable when this returns."""
        path = self._path(rel)
        if not self._local:
            pq.write_table(table, path, filesystem=self.fs)  # one object, visible once complete
            return
        _makedirs(os.path.dirname(path))
        tmp = path + ".tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # the record written next names this file: its directory entry must be durable before that,
        # or a power loss could leave a record whose staged file is gone (recover would skip the move)
        _fsync_dir(os.path.dirname(path))

    def _put_record(self, rel: str, data: bytes) -> None:
        """Replace a progress record atomically."""
        path = self._path(rel)
        if not self._local:
            with self.fs.open_output_stream(path) as f:  # a single-object PUT: atomic
                f.write(data)
            return
        _makedirs(os.path.dirname(path))
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))

    def _apply_moves(self, moves: list[tuple[str, str]]) -> None:
        """Move every staged file that still exists to its place in the dataset (idempotent)."""
        if not moves:
            return
        sources = self.fs.get_file_info([self._path(staged) for staged, _ in moves])
        for (_, final), src in zip(moves, sources, strict=True):
            if src.type == pafs.FileType.NotFound:
                continue  # moved before a crash
            dst = self._path(final)
            if self._local:
                _makedirs(os.path.dirname(dst))
                os.replace(src.path, dst)
                _fsync_dir(os.path.dirname(dst))
            else:
                self.fs.move(src.path, dst)  # copy, then delete the source

    def _remove_dir(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self._path(rel))


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of a store location: a local path or a pyarrow URI.

    >>> fs, root = open_location("file:///tmp/history")
    >>> type(fs).__name__, root
    ('LocalFileSystem', '/tmp/history')
    """
    if not _URI.match(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        fs, root = _from_uri(location)
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        shown = redact_location(location)
        raise ConfigError(
            [
                f"storage.history: cannot open {shown}: {str(e).replace(location, shown)}; expected a local path "
                "or a URI that pyarrow.fs.FileSystem.from_uri understands, e.g. "
                "s3://bucket/prefix?region=eu-west-1 or s3://bucket/prefix?endpoint_override=host:9000&scheme=http"
            ]
        ) from None
    return fs, root.rstrip("/")


@functools.lru_cache(maxsize=16)
def _from_uri(location: str) -> tuple[pafs.FileSystem, str]:
    # Cached: jobs build a HistoryStore per read, and an S3 URI without a region costs a request.
    return pafs.FileSystem.from_uri(location)


def redact_location(location: str) -> str:
    """``location`` without the credentials a URI may carry (``s3://KEY:SECRET@bucket/...``)."""
    if not _URI.match(location):
        return location
    parts = urlsplit(location)
    if "@" not in parts.netloc:
        return location
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _series_filter(series: str | list[str] | None) -> ds.Expression | None:
    """Dataset filter for one series, a list of them, or all (None)."""
    if series is None:
        return None
    return ds.field("series").isin([series] if isinstance(series, str) else list(series))


def _merge_stats(parts: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(parts).group_by("series").agg(pl.col("windows").sum(), pl.col("last_end").max())


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms // 1000)) if ms >= 0 else "0000-00-00"


def _makedirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, then fsync the parent of every directory it created: a new
    directory's entry is durable only once its parent is synced."""
    created, p = [], path
    while p and not os.path.isdir(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    for d in reversed(created):
        _fsync_dir(os.path.dirname(d) or ".")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside_local_store(settings: Settings) -> Path | None:
    """Move the default local history store (``<data_dir>/history``, with its progress records and the jobs'
    saved state) to ``<data_dir>/previous/<UTC time>/history``; return where it went, or None when there is
    none or ``storage.history`` names another store (which is left as it is).

    For the embedded stack: its tansu broker keeps topics in memory, so each start is a new broker whose
    offsets begin at 0, and progress records counting the previous broker's offsets would make ingest and
    the forecast job skip what is replayed there. Nothing is deleted; the move is logged."""
    if settings.storage.history:
        log.warning("storage.history %s outlives the embedded in-memory broker: its progress records count the "
                    "offsets of an earlier broker", redact_location(settings.storage.history))
        return None
    store = settings.data_dir / "history"
    if not store.is_dir() or not any(store.iterdir()):
        return None
    if (running := running_stack(settings)) is not None:
        log.warning("another rollcast up (pid %s) runs on %s: its history store is left where it is",
                    running.get("pid"), settings.data_dir)
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = settings.data_dir / "previous" / stamp / "history"
    n = 1
    while target.exists():  # two starts within a second
        n += 1
        target = settings.data_dir / "previous" / f"{stamp}-{n}" / "history"
    target.parent.mkdir(parents=True)
    os.replace(store, target)
    log.warning("the embedded broker starts empty: the previous run's history store moved to %s", target)
    return target
