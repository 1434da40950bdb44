"""The history store: closed windows as a Parquet dataset, partitioned by day.

The store lives at ``settings.history_location``: a local directory (default
``<data_dir>/history``) or any URI :func:`pyarrow.fs.FileSystem.from_uri`
understands (setting ``storage.history``), e.g.
``s3://bucket/prefix?endpoint_override=minio:9000&scheme=http`` or
``gs://bucket/prefix``. Every access goes through :mod:`pyarrow.fs`. Layout::

    day=2024-01-01/<checkpoint-id>-<topic>-<partition>.parquet   closed windows
    _progress/<topic>-<partition>/<seq>.json                      commit points per partition (a record log)
    _state/<name>.log/<seq>.state                                 a job's state (forecast: scoring)
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

**Fencing.** Only the process that owns a partition may write its progress record or a job's state for
it. A process frozen past its session timeout (a GC pause, a VM migration, a stalled disk) and thawed after
the group gave its partitions to another must not: its windows would be stored twice and its records
would take the new owner back to an older position. Kafka refuses such a zombie's offset commit by its
stale generation; the store refuses its writes the same way, by a fencing token: each record is the next
entry of a log of immutable files, ``<log>/<seq>``, and the newest entry is the record.

1. :meth:`HistoryStore.claim` (at every assignment; :meth:`HistoryStore.claim_state` for a job's state)
   reads the newest entry ``n``, finishes what it names (the moves of step 3 above), and creates entry
   ``n + 1`` with *create-if-absent*. The :class:`Lease` it returns holds ``n + 1``.
2. Every later write under that lease creates the entry after the lease's, again only if absent, then
   lists the log: an entry above its own means another writer claimed the log since, so it deletes its
   entry, which no reader takes as the record since a newer one exists, and is refused
   (:class:`FencedWrite`). Its entry either sat in a gap left by pruning, or was the newest for a moment
   and a claim read it, finished its moves and carried its position into the claim's entry: then its
   windows are stored once, as the new owner's. Otherwise nothing it staged is moved into the dataset.
   What a checkpoint produced to Kafka before its store write (windows, dead letters) stays
   at-least-once, as after a crash: a repeat of the same window with the same values.
3. Two writers can never both create entry ``k``, so between a claim and any write of an older lease
   the older one is refused: its next entry exists already (the claim's) or a newer one does. Entries
   more than a few behind the newest are deleted after each write; the listing in step 2 keeps that
   safe.

*Create-if-absent* is atomic everywhere it is used: on local disk a hard link of a fully written and
fsynced temporary file (``link(2)`` fails if the name exists; ``rename`` would replace it); on S3 a
conditional PUT (``If-None-Match: *``, which S3 has honoured since 2024, and MinIO and moto too; GCS
offers ``ifGenerationMatch=0`` and Azure ``If-None-Match: *`` for the same, not wired here: on those a
write checks the name first, and a warning says the fence is not atomic there). The newest entry is
found by listing, strongly consistent on local disk, S3, GCS and Azure.

**Topic incarnation.** Each progress record and saved state carries the Kafka topic ID of the topic whose
offsets it counts (:func:`pipeline.kafka.group.topic_id`; Kafka's own identity of a topic's incarnation:
deleting and creating a topic again gives a new ID and offsets from 0, which the cluster ID plus a name
cannot tell apart). A claim that finds another ID reports it, and by ``kafka.on_new_topic`` either
starts the partition afresh or refuses (:class:`TopicIncarnationChanged`).

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
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import Settings, running_stack
from pipeline.errors import ConfigError, RollcastError, StoreUnavailable
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


KEEP_ENTRIES = 3  # entries of a record log kept below the newest (for a look at recent history)
_SEQ = re.compile(r"^(\d{16})\.(json|state)$")
_STATE_MAGIC = b"rollcast-state 1\n"


class FencedWrite(RollcastError):
    """A write refused because another process claimed the record since this one's :class:`Lease`: the
    partition is no longer this process's. Nothing of the write became visible."""


class TopicIncarnationChanged(RollcastError):
    """A progress record or saved state counts offsets of another incarnation of its topic (another topic
    ID), and ``kafka.on_new_topic`` is ``stop``."""


@dataclass
class Lease:
    """A writer's claim on one record log (see the module docstring): ``seq`` is the newest entry it wrote;
    its next write creates ``seq + 1``. ``topic_id``: the incarnation its records count offsets in."""

    log: str
    seq: int
    topic_id: str | None = None


@dataclass(frozen=True)
class Claim:
    """What :meth:`HistoryStore.claim` found and took: the lease, the partition's progress (None: nothing
    processed in this incarnation of the topic), and whether the record it found counted offsets of another
    incarnation (``previous_topic_id``), which the claim reset."""

    lease: Lease
    progress: Progress | None
    new_topic: bool = False
    previous_topic_id: str | None = None


@dataclass(frozen=True)
class StateClaim:
    """What :meth:`HistoryStore.claim_state` found and took: the lease, the state (None: none saved for this
    incarnation of the topic), and whether a state of another incarnation was set aside."""

    lease: Lease
    data: bytes | None
    new_topic: bool = False
    previous_topic_id: str | None = None


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
        self._s3 = _S3Creator.of(location) if isinstance(self.fs, pafs.S3FileSystem) else None

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
    def max_window_end(self, ends_from_ms: int | None = None, window_ms: int = DAY_MS) -> dict[str, int]:
        """End of the last stored window of every series; with ``ends_from_ms``, of every series whose last
        window ends at or after it (the others are left out).

        With the bound (an ingest assignment's: only recent windows can meet replayed events, see
        :meth:`pipeline.ingest.ingestor.Ingestor.assign`) this reads only the day directories that can
        hold such windows (``window_ms``: the longest a window may be, so that its start's day is known)
        and, there, only the files whose Parquet footer says they hold one: on a long history the cost
        follows the recent files, not the store."""
        if ends_from_ms is None:
            stats = self._series_stats()
            return dict(zip(stats["series"].to_list(), stats["last_end"].to_list(), strict=True))
        files = [f for f in self._files(ends_from_ms - window_ms, None)
                 if (end := self._max_window_end_of(f)) is not None and end >= ends_from_ms]
        out: dict[str, int] = {}
        if not files:
            return out
        dataset = ds.dataset(files, filesystem=self.fs, format="parquet")
        flt = ds.field("window_end") >= ends_from_ms
        for batch in dataset.to_batches(columns=["series", "window_end"], filter=flt, batch_size=1 << 20):
            if batch.num_rows:
                last = pl.from_arrow(batch).group_by("series").agg(pl.col("window_end").max())
                for series, end in zip(last["series"].to_list(), last["window_end"].to_list(), strict=True):
                    if series not in out or end > out[series]:
                        out[series] = end
        return out

    def series_ends(self) -> SeriesEnds:
        """The end of each series' last stored window, read when asked for, newest day first
        (:class:`SeriesEnds`), over the day directories there are now."""
        return SeriesEnds(self, list(reversed(self._days(None, None))))

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

    @_io("claiming a partition")
    def claim(self, topic: str, partition: int, topic_id: str | None = None,
              on_new_topic: str = "restart") -> Claim:
        """Take the partition's record log for this process (step 1 of the fencing in the module docstring):
        finish the newest record's moves, then write the next entry. Every write of an earlier lease is
        refused from now on.

        ``topic_id``: the incarnation of ``topic`` the caller reads. A newest record of another one counts
        offsets that mean nothing now: with ``on_new_topic="restart"`` the claim starts the partition afresh
        (progress None, ``new_topic`` set), with ``"stop"`` it raises :class:`TopicIncarnationChanged`.
        """
        name = f"{topic}-{partition}"
        log_dir = f"_progress/{name}"
        while True:
            seq, raw = self._newest(log_dir, legacy=f"_progress/{name}.json") or (0, None)
            record = json.loads(raw) if raw is not None else {}
            if record.get("moves"):
                self._apply_moves([tuple(m) for m in record["moves"]])
            previous = record.get("topic_id")
            progress = _progress_of(record)
            new_topic = progress is not None and _differ(previous, topic_id)
            if new_topic:
                if on_new_topic == "stop":
                    raise TopicIncarnationChanged(
                        f"{topic}[{partition}]: the history store's progress record counts offsets of topic ID "
                        f"{previous}, the broker's {topic} is topic ID {topic_id} (deleted and created again, or "
                        "another broker): set kafka.on_new_topic = \"restart\" to read it from its beginning")
                progress = None
            lease = Lease(log_dir, seq, topic_id or previous)
            entry = {**_record_of(progress), "checkpoint": None, "moves": [], "topic_id": lease.topic_id,
                     "claimed_by": _owner(), "entry": uuid.uuid4().hex}
            try:
                self._append(lease, json.dumps(entry).encode(), "json")
            except FencedWrite:
                continue  # another claim took entry seq + 1 meanwhile: read it and claim after it
            # Only now, with every earlier lease refused, is what an earlier owner staged and no record names
            # garbage: removing it before the claim won could delete files a record about to win names.
            self._remove_dir(f"_pending/{name}")
            return Claim(lease, progress, new_topic, previous if new_topic else None)

    @_io("writing a checkpoint")
    def write_checkpoint(self, topic: str, partition: int, windows: pl.DataFrame, progress: Progress,
                         lease: Lease | None = None) -> None:
        """Make ``windows`` and ``progress`` of one source partition durable, exactly once.

        ``lease``: the claim this write is made under (:meth:`claim`); a write refused because another
        process claimed the partition since raises :class:`FencedWrite` and stores nothing. Without a
        lease the caller declares itself the only writer (tools, tests) and the write follows the newest
        record."""
        name = f"{topic}-{partition}"
        if lease is None:
            newest = self._newest(f"_progress/{name}", legacy=f"_progress/{name}.json")
            lease = Lease(f"_progress/{name}", 0 if newest is None else newest[0],
                          None if newest is None else json.loads(newest[1]).get("topic_id"))
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
        record = {**_record_of(progress), "checkpoint": ckpt, "moves": moves, "topic_id": lease.topic_id,
                  "entry": uuid.uuid4().hex}
        try:
            self._append(lease, json.dumps(record).encode(), "json")  # the commit point
        except FencedWrite:
            self._remove_dir(stage)
            raise
        self._apply_moves(moves)
        if moves:
            self._remove_dir(stage)

    @_io("recovering a checkpoint")
    def recover(self, topic: str, partition: int) -> Progress | None:
        """Finish or discard what a crash interrupted; return the partition's last progress (None: no
        record, or one that starts the partition afresh). For a store no other process writes (tools,
        tests): it claims nothing, and discards staged files of any writer; the jobs use :meth:`claim`."""
        name = f"{topic}-{partition}"
        newest = self._newest(f"_progress/{name}", legacy=f"_progress/{name}.json")
        record = json.loads(newest[1]) if newest is not None else {}
        if record.get("moves"):
            self._apply_moves([tuple(m) for m in record["moves"]])
        self._remove_dir(f"_pending/{name}")
        return _progress_of(record)

    @_io("reading a progress record")
    def progress(self, topic: str, partition: int) -> Progress | None:
        """The partition's progress as its newest record says, changing nothing (for monitoring and tests;
        :meth:`recover` and :meth:`claim` are the writers')."""
        newest = self._newest(f"_progress/{topic}-{partition}", legacy=f"_progress/{topic}-{partition}.json")
        return None if newest is None else _progress_of(json.loads(newest[1]))

    @_io("claiming a job's state")
    def claim_state(self, name: str, topic_id: str | None = None, on_new_topic: str = "restart") -> StateClaim:
        """Take ``name``'s state log for this process (as :meth:`claim` does a partition's) and return the
        state saved there. A state saved for another incarnation of its topic (``topic_id``) is not
        returned (``on_new_topic="restart"``) or refused (``"stop"``: :class:`TopicIncarnationChanged`)."""
        log_dir = f"_state/{name}.log"
        while True:
            seq, raw = self._newest(log_dir, legacy=f"_state/{name}") or (0, None)
            previous, data = _unwrap_state(raw) if raw is not None else (None, None)
            new_topic = data is not None and _differ(previous, topic_id)
            if new_topic:
                if on_new_topic == "stop":
                    raise TopicIncarnationChanged(
                        f"the state {name} was saved for topic ID {previous}, the broker's topic is {topic_id} "
                        "(deleted and created again, or another broker): set kafka.on_new_topic = \"restart\" "
                        "to start it afresh")
                data = None
            lease = Lease(log_dir, seq, topic_id or previous)
            try:
                self._append(lease, _wrap_state(lease.topic_id, data), "state")
            except FencedWrite:
                continue
            return StateClaim(lease, data, new_topic, previous if new_topic else None)

    @_io("writing a job's state")
    def write_state(self, name: str, data: bytes, lease: Lease | None = None) -> None:
        """Save ``data`` as ``name``'s state, atomically, durable when this returns (a job's state beside the
        windows, e.g. the forecast job's scoring and calibration state per windows partition). ``lease``: as
        in :meth:`write_checkpoint` (a refused write raises :class:`FencedWrite`)."""
        if lease is None:
            newest = self._newest(f"_state/{name}.log", legacy=f"_state/{name}")
            lease = Lease(f"_state/{name}.log", 0 if newest is None else newest[0],
                          None if newest is None else _unwrap_state(newest[1])[0])
        self._append(lease, _wrap_state(lease.topic_id, data), "state")

    @_io("reading a job's state")
    def read_state(self, name: str) -> bytes | None:
        """What :meth:`write_state` last wrote under ``name`` (None: nothing, or a claim that started it
        afresh)."""
        newest = self._newest(f"_state/{name}.log", legacy=f"_state/{name}")
        return None if newest is None else _unwrap_state(newest[1])[1]

    # -- record logs (the fencing, see the module docstring) ---------------------------------

    def _entries(self, log_dir: str) -> list[int]:
        """Sequence numbers of the log's entries, ascending."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(log_dir), allow_not_found=True))
        return sorted(int(m.group(1)) for i in infos if (m := _SEQ.match(i.base_name)))

    def _newest(self, log_dir: str, legacy: str) -> tuple[int, bytes] | None:
        """The newest entry of a log and its bytes; a store written before record logs has one record at
        ``legacy``, read as entry 0. None: no record."""
        for _ in range(10):
            seqs = self._entries(log_dir)
            if not seqs:
                break
            try:
                return seqs[-1], self._read(f"{log_dir}/{self._entry_name(log_dir, seqs[-1])}")
            except FileNotFoundError:
                continue  # pruned between the listing and the read: a newer entry exists, list again
        if seqs:
            raise StoreUnavailable(f"history store {self.location}: the newest entry of {log_dir} kept vanishing")
        try:
            return 0, self._read(legacy)
        except FileNotFoundError:
            return None

    def _entry_name(self, log_dir: str, seq: int) -> str:
        return f"{seq:016d}.{'json' if log_dir.startswith('_progress/') else 'state'}"

    def _append(self, lease: Lease, data: bytes, kind: str) -> None:
        """Write the entry after ``lease``'s, or raise :class:`FencedWrite` (steps 2 and 3 of the fencing)."""
        seq = lease.seq + 1
        rel = f"{lease.log}/{seq:016d}.{kind}"
        if not self._create(rel, data):
            _count_fenced()
            raise FencedWrite(f"{lease.log}: entry {seq} exists, another process claimed it since entry {lease.seq}")
        seqs = self._entries(lease.log)
        if seqs and seqs[-1] > seq:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self._path(rel))
            _count_fenced()
            raise FencedWrite(f"{lease.log}: entry {seqs[-1]} is newer than this write's {seq}: another process "
                              "claimed it")
        lease.seq = seq
        for old in seqs:
            if old < seq - KEEP_ENTRIES:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(self._path(f"{lease.log}/{old:016d}.{kind}"))

    def _create(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` if no file has that name (atomic, durable when this returns);
        False if one has."""
        path = self._path(rel)
        if self._local:
            _makedirs(os.path.dirname(path))
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if the name exists; rename would replace it
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            _fsync_dir(os.path.dirname(path))
            return True
        if self._s3 is not None:
            return self._s3.create(path, data)
        _warn_unfenced(self.location)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        with self.fs.open_output_stream(path) as f:
            f.write(data)
        return True

    def _read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

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

    def _apply_moves(self, moves: list[tuple[str, str]]) -> None:
        """Move every staged file that still exists to its place in the dataset (idempotent)."""
        if not moves:
            return
        sources = self.fs.get_file_info([self._path(staged) for staged, _ in moves])
        for (_, final), src in zip(moves, sources, strict=True):
            if src.type == pafs.FileType.NotFound:
                continue  # moved before a crash
            dst = self._path(final)
            try:
                if self._local:
                    _makedirs(os.path.dirname(dst))
                    os.replace(src.path, dst)
                    _fsync_dir(os.path.dirname(dst))
                else:
                    self.fs.move(src.path, dst)  # copy, then delete the source
            except FileNotFoundError:
                # moved meanwhile by a claim that took over the record naming it (the same move, the same bytes)
                if self.fs.get_file_info(dst).type == pafs.FileType.NotFound:
                    raise

    def _remove_dir(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self._path(rel))


class SeriesEnds:
    """End of each series' last stored window, read lazily: :meth:`get` reads day directories newest first,
    from where the previous call stopped, until every series asked for is found (a series' last window lies
    in the newest day directory that holds it), keeping the ends of every series it passes. Over its life it
    reads the store at most once, and a series that ended recently costs a read of the recent days only.
    Not thread-safe (one ingest worker uses it)."""

    def __init__(self, store: HistoryStore, days: list[str]):
        self.store = store
        self.days = days  # not read yet, newest first
        self.ends: dict[str, int] = {}

    def get(self, series: list[str]) -> dict[str, int]:
        """``{series: end}`` of those of ``series`` that are stored (the others never were)."""
        missing = {s for s in series if s not in self.ends}
        while missing and self.days:
            day = self.days.pop(0)
            seen: dict[str, int] = {}
            files = self.store._day_files(day)
            if files:
                dataset = ds.dataset(files, filesystem=self.store.fs, format="parquet")
                for batch in dataset.to_batches(columns=["series", "window_end"], batch_size=1 << 20):
                    if batch.num_rows:
                        last = pl.from_arrow(batch).group_by("series").agg(pl.col("window_end").max())
                        for name, end in zip(last["series"].to_list(), last["window_end"].to_list(), strict=True):
                            if name not in seen or end > seen[name]:
                                seen[name] = end
            for name, end in seen.items():
                self.ends.setdefault(name, end)  # a newer day already gave a later end
            missing -= seen.keys()
        return {s: self.ends[s] for s in series if s in self.ends}


def _progress_of(record: dict[str, Any]) -> Progress | None:
    if record.get("position") is None:
        return None
    safe = record.get("safe")
    return Progress(position=int(record["position"]), max_ts=record.get("max_ts"),
                    safe=None if safe is None else int(safe))


def _record_of(progress: Progress | None) -> dict[str, Any]:
    if progress is None:
        return {"position": None, "max_ts": None, "safe": None}
    return {"position": progress.position, "max_ts": progress.max_ts, "safe": progress.safe}


def _differ(previous: str | None, current: str | None) -> bool:
    """Whether two topic IDs name different incarnations (an unknown one differs from none)."""
    return previous is not None and current is not None and previous != current


def _wrap_state(topic_id: str | None, data: bytes | None) -> bytes:
    """A state entry: a header line naming its topic incarnation, then the state's bytes (none: ``"empty"``)."""
    header = json.dumps({"topic_id": topic_id, "empty": data is None, "by": _owner(),
                         "entry": uuid.uuid4().hex}).encode()
    return _STATE_MAGIC + header + b"\n" + (data or b"")


def _unwrap_state(raw: bytes) -> tuple[str | None, bytes | None]:
    """``(topic_id, state)`` of a state entry; a state saved before entries had headers is all state."""
    if not raw.startswith(_STATE_MAGIC):
        return None, raw
    header, _, data = raw[len(_STATE_MAGIC):].partition(b"\n")
    meta = json.loads(header)
    return meta.get("topic_id"), None if meta.get("empty") else data


@functools.cache
def _owner() -> str:
    """Who wrote an entry, for a person reading the log: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _count_fenced() -> None:
    from pipeline.observability import FENCED_WRITES

    FENCED_WRITES.inc()


@functools.cache
def _warn_unfenced(location: str) -> None:
    log.warning("history store %s: this filesystem offers rollcast no atomic create-if-absent, so a frozen "
                "process that wakes up after its partitions moved is fenced only by a check before its write "
                "(local disk and S3 are fenced atomically; see pipeline/store.py)", location)


class _S3Creator:
    """Create-if-absent on S3: a PUT with ``If-None-Match: *`` (boto3; pyarrow's S3 filesystem cannot send
    it). Credentials, region and endpoint come from the store's URI, else boto3's usual chain."""

    def __init__(self, client: Any):
        self.client = client

    @staticmethod
    def of(location: str) -> _S3Creator:
        import boto3
        from botocore.config import Config

        parts = urlsplit(location)
        query = dict(kv.split("=", 1) for kv in parts.query.split("&") if "=" in kv)
        kwargs: dict[str, Any] = {"config": Config(retries={"max_attempts": 5, "mode": "standard"})}
        if "@" in parts.netloc:
            creds = parts.netloc.rsplit("@", 1)[0]
            key, _, secret = creds.partition(":")
            kwargs.update(aws_access_key_id=unquote(key), aws_secret_access_key=unquote(secret))
        if "region" in query:
            kwargs["region_name"] = query["region"]
        if "endpoint_override" in query:
            host = query["endpoint_override"]
            kwargs["endpoint_url"] = host if "://" in host else f"{query.get('scheme', 'https')}://{host}"
        return _S3Creator(boto3.client("s3", **kwargs))

    def create(self, path: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        for attempt in range(5):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if code == "PreconditionFailed":
                    # our own PUT may have landed and its answer been lost (botocore then retried): every entry
                    # holds a nonce, so the same bytes there are this write, not another writer's
                    return self._holds(bucket, key, data)
                if code == "ConditionalRequestConflict" and attempt < 4:  # a concurrent PUT of the same key
                    time.sleep(0.05 * (attempt + 1))
                    continue
                raise OSError(f"S3 PUT s3://{bucket}/{key}: {e}") from e
        return False

    def _holds(self, bucket: str, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            return bool(self.client.get_object(Bucket=bucket, Key=key)["Body"].read() == data)
        except ClientError:
            return False


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
