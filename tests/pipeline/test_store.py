"""The history store on a local directory and on S3 (a real moto server): reads, day pruning, and
exactly-once writes when a checkpoint crashes before or after its commit point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_settings, stack_file
from pipeline.errors import ConfigError
from pipeline.store import HistoryStore, Progress, set_aside_local_store
from pipeline.windows import WINDOW_SCHEMA
from tests.support.s3 import S3_KEYS
from tests.support.store import DAY, HOUR, T0, crash_while_moving, windows

TOPIC = "obs"


def expected(*frames: pl.DataFrame) -> pl.DataFrame:
    return pl.concat(frames).sort("series", "window_start")


def pending_files(store: HistoryStore) -> list[str]:
    infos = store.fs.get_file_info(
        pafs.FileSelector(f"{store.root}/_pending", recursive=True, allow_not_found=True)
    )
    return [i.path for i in infos if i.type == pafs.FileType.File]


# Two checkpoints of one partition; the second spans midnight, so it writes two day files.
FIRST = windows(["a", "b"], [T0 + h * HOUR for h in range(0, 20)])
SECOND = windows(["a", "b"], [T0 + h * HOUR for h in range(20, 30)])


def test_counter_reads_each_file_once(store_location: str, monkeypatch) -> None:
    store = HistoryStore(store_location)
    count = store.counter()
    assert count() == 0
    reads: list[str] = []
    read_metadata = pq.read_metadata
    monkeypatch.setattr(pq, "read_metadata", lambda path, **kw: reads.append(path) or read_metadata(path, **kw))
    store.write_checkpoint(TOPIC, 0, FIRST, Progress(10, T0))
    assert count() == store.count() == 40 and len(reads) == 1
    store.write_checkpoint(TOPIC, 0, SECOND, Progress(20, T0 + 30 * HOUR))  # two day files
    assert count() == store.count() == 60 and len(reads) == 3 and len(set(reads)) == 3
    assert count() == 60 and len(reads) == 3  # nothing new: no file read


def test_empty_store_reads_nothing(store_location: str) -> None:
    store = HistoryStore(store_location)
    assert store.read().height == 0
    assert store.count() == 0
    assert store.max_window_end() == {}
    assert store.recover(TOPIC, 0) is None


def test_write_then_read_filters_sorts_and_counts(store_location: str) -> None:
    store = HistoryStore(store_location)
    store.write_checkpoint(TOPIC, 0, FIRST, Progress(10, T0))
    store.write_checkpoint(TOPIC, 0, SECOND, Progress(20, T0 + 30 * HOUR))
    store.write_checkpoint(TOPIC, 1, pl.DataFrame(schema=WINDOW_SCHEMA), Progress(5, None))

    reader = HistoryStore(store_location)  # another process's view
    everything = expected(FIRST, SECOND)
    assert reader.read().equals(everything)
    assert reader.count() == everything.height == 60
    assert reader.max_window_end() == {"a": T0 + 30 * HOUR, "b": T0 + 30 * HOUR}
    assert reader.read(series="b").equals(everything.filter(pl.col("series") == "b"))
    span = reader.read(["a"], start_ms=T0 + 18 * HOUR, end_ms=T0 + 22 * HOUR)
    assert span["window_start"].to_list() == [T0 + h * HOUR for h in range(18, 22)]
    assert reader.last_windows(2)["window_start"].to_list() == [T0 + 28 * HOUR, T0 + 29 * HOUR] * 2
    assert reader.recover(TOPIC, 0) == Progress(20, T0 + 30 * HOUR)
    assert reader.recover(TOPIC, 1) == Progress(5, None)
    assert pending_files(reader) == []


@pytest.mark.parametrize("n", [1, 3, 30, 200])
def test_last_windows_reads_days_newest_first_and_equals_a_full_read(store_location: str, n: int) -> None:
    store = HistoryStore(store_location)
    # "a" spans four days, "b" has two windows on the first day only, "c" only the last day's, and
    # "d" one window on each of two days far apart
    store.write_checkpoint(TOPIC, 0, windows(["a"], [T0 + h * HOUR for h in range(0, 80)]), Progress(1, None))
    store.write_checkpoint(TOPIC, 1, windows(["b"], [T0, T0 + HOUR]), Progress(1, None))
    store.write_checkpoint(TOPIC, 1, windows(["c"], [T0 + 79 * HOUR]), Progress(2, None))
    store.write_checkpoint(TOPIC, 2, windows(["d"], [T0 + 2 * HOUR, T0 + 75 * HOUR]), Progress(1, None))
    everything = store.read()
    want = everything.group_by("series", maintain_order=True).tail(n)
    assert store.last_windows(n).equals(want)
    assert store.last_windows(n, series=["b", "d"]).equals(want.filter(pl.col("series").is_in(["b", "d"])))
    assert store.max_window_end() == {s: int(part["window_end"].max())
                                      for (s,), part in everything.group_by("series")}


def test_last_windows_while_ingest_adds_files_has_no_hole(store_location: str, monkeypatch) -> None:
    """A checkpoint stored between last_windows' two passes (ingest runs beside the forecast job that
    calls it). "a" had 10 windows when they were counted, then 10 more came: applying that count to all
    20 returned windows 10..19, not the last 12 of any moment. A forecast job refreshing a series for a
    batch older than the store's newest windows then had a hole in its contexts right before the batch,
    and skipped those windows' forecasts (a forecast missing after a scale-out, tests/test_faults.py)."""
    store = HistoryStore(store_location)
    store.write_checkpoint(TOPIC, 0, windows(["a"], [T0 + h * HOUR for h in range(0, 10)]), Progress(1, None))
    before = store.read()
    stats = HistoryStore._series_stats

    def then_ingest_writes(self, *args, **kwargs):
        out = stats(self, *args, **kwargs)
        self.write_checkpoint(TOPIC, 0, windows(["a"], [T0 + h * HOUR for h in range(10, 20)]), Progress(2, None))
        return out

    monkeypatch.setattr(HistoryStore, "_series_stats", then_ingest_writes)
    got = store.last_windows(12)
    assert got.equals(before.tail(12)), got["window_start"].to_list()


def test_last_windows_of_an_empty_store_has_the_window_schema(store_location: str) -> None:
    assert HistoryStore(store_location).last_windows(5).schema == pl.Schema(WINDOW_SCHEMA)


def test_reads_open_only_the_days_in_range(store_location: str) -> None:
    store = HistoryStore(store_location)
    store.write_checkpoint(TOPIC, 0, windows(["a"], [T0, T0 + 2 * DAY]), Progress(2, None))
    # An unreadable file in the day between: a read that opened that day would fail.
    store.fs.create_dir(f"{store.root}/day=2023-11-15")
    with store.fs.open_output_stream(f"{store.root}/day=2023-11-15/broken.parquet") as f:
        f.write(b"not parquet")
    assert store.read(end_ms=T0 + DAY)["window_start"].to_list() == [T0]
    assert store.read(start_ms=T0 + 2 * DAY)["window_start"].to_list() == [T0 + 2 * DAY]
    with pytest.raises(pa.ArrowInvalid):
        store.read()


@pytest.mark.parametrize("copied", [0, 1], ids=["before-any-move", "after-a-copy-before-its-delete"])
def test_crash_after_the_commit_point_is_finished_by_recover(
    store_location: str, copied: int, monkeypatch
) -> None:
    store = HistoryStore(store_location)
    store.write_checkpoint(TOPIC, 0, FIRST, Progress(10, T0))
    crash_while_moving(store, TOPIC, 0, SECOND, Progress(20, T0 + 30 * HOUR), monkeypatch, copied=copied)
    assert len(pending_files(store)) == 2  # one staged file per day

    restarted = HistoryStore(store_location)
    before = restarted.read()
    assert before.select("series", "window_start").is_duplicated().sum() == 0  # staging is invisible
    assert restarted.recover(TOPIC, 0) == Progress(20, T0 + 30 * HOUR)  # the record was committed
    assert restarted.read().equals(expected(FIRST, SECOND))
    assert pending_files(restarted) == []
    assert restarted.recover(TOPIC, 0) == Progress(20, T0 + 30 * HOUR)  # recovering again changes nothing
    assert restarted.read().equals(expected(FIRST, SECOND))


def test_staging_no_record_names_is_discarded(store_location: str, monkeypatch) -> None:
    store = HistoryStore(store_location)
    store.write_checkpoint(TOPIC, 0, FIRST, Progress(10, T0))

    def crash(rel: str, data: bytes) -> bool:
        raise OSError("killed before the progress record was written")

    monkeypatch.setattr(store, "_create", crash)
    with pytest.raises(OSError, match="killed"):
        store.write_checkpoint(TOPIC, 0, SECOND, Progress(20, T0 + 30 * HOUR))
    assert len(pending_files(store)) == 2

    restarted = HistoryStore(store_location)
    assert restarted.recover(TOPIC, 0) == Progress(10, T0)  # the restart redoes the second checkpoint
    assert pending_files(restarted) == []
    assert restarted.read().equals(FIRST.sort("series", "window_start"))
    restarted.write_checkpoint(TOPIC, 0, SECOND, Progress(20, T0 + 30 * HOUR))
    assert restarted.read().equals(expected(FIRST, SECOND))


def test_location_from_settings_and_errors_hide_credentials(tmp_path, s3_uri: str) -> None:
    local = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path)})
    assert HistoryStore(local).root == str(tmp_path / "history")
    remote = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_STORAGE__HISTORY": s3_uri})
    store = HistoryStore(remote)
    assert isinstance(store.fs, pafs.S3FileSystem)
    assert S3_KEYS not in store.location and store.location.startswith("s3://rollcast-test/")
    with pytest.raises(ConfigError, match="storage.history") as e:
        HistoryStore(s3_uri.replace("scheme=http", "schema=http"))  # a typo in the query
    assert "rollcast-secret" not in str(e.value)
    with pytest.raises(ConfigError, match="storage.history"):
        _ = remote.history_dir  # remote stores have no local directory


def test_local_directory_entries_are_synced_before_the_record_names_them(tmp_path, monkeypatch) -> None:
    """On a local disk a renamed or created entry survives a power loss only once its directory is
    fsynced: the staged files' directory (and every directory created for it) before the commit point,
    the dataset's day directories (and the root, which gains them) before the checkpoint returns."""
    import pipeline.store as store_module

    events: list[str] = []
    real_fsync_dir = store_module._fsync_dir
    monkeypatch.setattr(store_module, "_fsync_dir", lambda path: (events.append(path), real_fsync_dir(path)))
    store = HistoryStore(str(tmp_path / "history"))
    real_create = store._create
    monkeypatch.setattr(store, "_create", lambda rel, data: (events.append("RECORD"), real_create(rel, data))[1])

    store.write_checkpoint(TOPIC, 0, SECOND, Progress(20, T0 + 30 * HOUR))  # two days
    root = str(tmp_path / "history")
    before = set(events[: events.index("RECORD")])
    (stage,) = {p for p in before if p.startswith(f"{root}/_pending/{TOPIC}-0/")}
    assert {str(tmp_path), root, f"{root}/_pending", f"{root}/_pending/{TOPIC}-0", stage} <= before
    after = set(events[events.index("RECORD") + 1:])
    days = {f"{root}/{d.name}" for d in (tmp_path / "history").iterdir() if d.name.startswith("day=")}
    assert len(days) == 2 and days | {root} <= after
    assert f"{root}/_progress/{TOPIC}-0" in before | after
    assert store.read().equals(expected(SECOND))


def test_the_embedded_stack_sets_aside_the_store_of_an_earlier_broker(tmp_path: Path) -> None:
    """``set_aside_local_store``: the default local store moves under previous/, whole; nothing else moves."""
    settings = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path)})
    assert set_aside_local_store(settings) is None  # no store yet
    record = tmp_path / "history" / "_progress" / "observations-0.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"safe_offset": 17520}')
    # a `rollcast up` still running on this data directory keeps its store
    stack_file(settings).write_text(json.dumps({"pid": os.getpid()}))
    assert set_aside_local_store(settings) is None and record.exists()
    stack_file(settings).write_text(json.dumps({"pid": 2**22 + 12345}))  # left behind by a killed one
    moved = set_aside_local_store(settings)
    assert moved is not None and moved.parent.parent == tmp_path / "previous"
    assert (moved / "_progress" / "observations-0.json").read_text() == '{"safe_offset": 17520}'
    assert not (tmp_path / "history").exists()
    # a store configured elsewhere is never moved
    elsewhere = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_STORAGE__HISTORY": str(tmp_path / "h")})
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "x").write_text("x")
    assert set_aside_local_store(elsewhere) is None and (tmp_path / "history" / "x").exists()
