"""The history store's fence (pipeline/store.py, "Fencing"): a writer whose partition another process has
claimed since is refused and leaves nothing a reader sees, on a local directory and on S3 (a real moto
server, whose conditional PUT is S3's); and records bound to the topic's incarnation (its topic ID)."""

from __future__ import annotations

import json

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.observability import FENCED_WRITES
from pipeline.store import KEEP_ENTRIES, FencedWrite, HistoryStore, Progress, TopicIncarnationChanged
from tests.support.store import HOUR, T0, windows

TOPIC = "obs"
FIRST = windows(["a", "b"], [T0 + h * HOUR for h in range(0, 10)])
SECOND = windows(["a", "b"], [T0 + h * HOUR for h in range(10, 20)])
THIRD = windows(["a", "b"], [T0 + h * HOUR for h in range(20, 30)])


def parquet_rows(store: HistoryStore) -> int:
    """Rows of every dataset file, read as any Parquet reader would (no store logic)."""
    infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True, allow_not_found=True))
    files = [i.path for i in infos if i.path.endswith(".parquet") and "/day=" in i.path and "/_" not in i.path]
    return sum(pq.read_metadata(f, filesystem=store.fs).num_rows for f in files)


def fenced_count() -> float:
    return FENCED_WRITES._value.get()


def test_a_thawed_owner_is_refused_and_stores_nothing(store_location: str) -> None:
    old, new = HistoryStore(store_location), HistoryStore(store_location)  # two processes
    mine = old.claim(TOPIC, 0).lease
    old.write_checkpoint(TOPIC, 0, FIRST, Progress(10, T0 + 10 * HOUR), lease=mine)
    # `old` freezes; the group gives the partition to `new`, which claims it and goes on
    taken = new.claim(TOPIC, 0)
    assert taken.progress == Progress(10, T0 + 10 * HOUR)
    new.write_checkpoint(TOPIC, 0, SECOND, Progress(20, T0 + 20 * HOUR), lease=taken.lease)
    before = fenced_count()
    with pytest.raises(FencedWrite):  # `old` thaws and checkpoints what it held: SECOND again
        old.write_checkpoint(TOPIC, 0, SECOND, Progress(20, T0 + 20 * HOUR), lease=mine)
    assert fenced_count() == before + 1
    assert parquet_rows(new) == FIRST.height + SECOND.height  # each window once
    assert new.progress(TOPIC, 0) == Progress(20, T0 + 20 * HOUR)
    new.write_checkpoint(TOPIC, 0, THIRD, Progress(30, T0 + 30 * HOUR), lease=taken.lease)
    assert new.read().height == FIRST.height + SECOND.height + THIRD.height
    assert new.claim(TOPIC, 0).progress == Progress(30, T0 + 30 * HOUR)


def test_a_stale_lease_is_refused_even_where_pruning_left_a_gap(store_location: str) -> None:
    """The entry after the stale lease's was pruned: the write creates it, sees a newer one and withdraws."""
    old, new = HistoryStore(store_location), HistoryStore(store_location)
    stale = old.claim(TOPIC, 0).lease
    lease = new.claim(TOPIC, 0).lease
    for i in range(KEEP_ENTRIES + 4):
        new.write_checkpoint(TOPIC, 0, pl.DataFrame(schema=FIRST.schema), Progress(i + 1, None), lease=lease)
    assert stale.seq + 1 not in new._entries(lease.log)  # pruned
    with pytest.raises(FencedWrite):
        old.write_checkpoint(TOPIC, 0, FIRST, Progress(99, T0), lease=stale)
    assert new.read().height == 0
    assert new.progress(TOPIC, 0) == Progress(KEEP_ENTRIES + 4, None)
    assert max(new._entries(lease.log)) == lease.seq  # the withdrawn entry is gone or older


def test_claims_race_and_each_gets_its_own_entry(store_location: str) -> None:
    a, b = HistoryStore(store_location), HistoryStore(store_location)
    first = a.claim(TOPIC, 0).lease
    second = b.claim(TOPIC, 0).lease
    assert second.seq == first.seq + 1
    with pytest.raises(FencedWrite):
        a.write_checkpoint(TOPIC, 0, FIRST, Progress(1, T0), lease=first)
    b.write_checkpoint(TOPIC, 0, FIRST, Progress(1, T0), lease=second)
    assert b.read().height == FIRST.height


def test_a_record_of_another_topic_incarnation_restarts_or_stops(store_location: str) -> None:
    store = HistoryStore(store_location)
    lease = store.claim(TOPIC, 0, topic_id="id-1").lease
    store.write_checkpoint(TOPIC, 0, FIRST, Progress(17520, T0 + 10 * HOUR, 17500), lease=lease)
    same = store.claim(TOPIC, 0, topic_id="id-1")
    assert not same.new_topic and same.progress == Progress(17520, T0 + 10 * HOUR, 17500)
    with pytest.raises(TopicIncarnationChanged, match="kafka.on_new_topic"):
        store.claim(TOPIC, 0, topic_id="id-2", on_new_topic="stop")
    fresh = store.claim(TOPIC, 0, topic_id="id-2")
    assert fresh.new_topic and fresh.previous_topic_id == "id-1" and fresh.progress is None
    assert store.recover(TOPIC, 0) is None  # a restart starts the new incarnation afresh too
    again = store.claim(TOPIC, 0, topic_id="id-2")
    assert not again.new_topic and again.progress is None
    assert store.read().height == FIRST.height  # the windows stay


def test_an_unknown_topic_id_is_not_a_new_incarnation(store_location: str) -> None:
    store = HistoryStore(store_location)
    lease = store.claim(TOPIC, 0, topic_id=None).lease
    store.write_checkpoint(TOPIC, 0, FIRST, Progress(5, T0), lease=lease)
    claim = store.claim(TOPIC, 0, topic_id="id-1")  # a broker that now tells IDs
    assert not claim.new_topic and claim.progress == Progress(5, T0)
    assert not store.claim(TOPIC, 0, topic_id=None).new_topic  # a client that cannot see them


def test_state_is_fenced_and_bound_to_its_topic(store_location: str) -> None:
    old, new = HistoryStore(store_location), HistoryStore(store_location)
    claim = old.claim_state("forecast/g/windows-0.npz", topic_id="w-1")
    assert claim.data is None and not claim.new_topic
    old.write_state("forecast/g/windows-0.npz", b"\x00state-1", lease=claim.lease)
    taken = new.claim_state("forecast/g/windows-0.npz", topic_id="w-1")
    assert taken.data == b"\x00state-1"
    with pytest.raises(FencedWrite):
        old.write_state("forecast/g/windows-0.npz", b"partial", lease=claim.lease)
    new.write_state("forecast/g/windows-0.npz", b"state-2", lease=taken.lease)
    assert new.read_state("forecast/g/windows-0.npz") == b"state-2"
    other = new.claim_state("forecast/g/windows-0.npz", topic_id="w-2")
    assert other.new_topic and other.data is None and other.previous_topic_id == "w-1"
    assert new.read_state("forecast/g/windows-0.npz") is None
    new.write_state("forecast/g/windows-0.npz", b"state-3", lease=other.lease)
    with pytest.raises(TopicIncarnationChanged):
        new.claim_state("forecast/g/windows-0.npz", topic_id="w-3", on_new_topic="stop")


def test_records_written_before_record_logs_are_read(tmp_path) -> None:
    """A store written by an earlier rollcast: one progress file per partition, one state file per name."""
    root = tmp_path / "history"
    (root / "_progress").mkdir(parents=True)
    (root / "_progress" / f"{TOPIC}-0.json").write_text(json.dumps(
        {"position": 7, "max_ts": T0, "safe": 6, "checkpoint": "x", "moves": []}))
    (root / "_state" / "forecast").mkdir(parents=True)
    (root / "_state" / "forecast" / "w-0.npz").write_bytes(b"old-state")
    store = HistoryStore(str(root))
    assert store.progress(TOPIC, 0) == Progress(7, T0, 6)
    claim = store.claim(TOPIC, 0, topic_id="id-1")
    assert claim.progress == Progress(7, T0, 6) and not claim.new_topic
    state = store.claim_state("forecast/w-0.npz", topic_id="id-1")
    assert state.data == b"old-state"


def test_max_window_end_from_a_bound_reads_only_recent_windows(store_location: str) -> None:
    store = HistoryStore(store_location)
    late = windows(["a"], [T0 + h * HOUR for h in range(30, 40)])
    for frame, pos in ((FIRST, 1), (SECOND, 2), (late, 3)):
        store.write_checkpoint(TOPIC, 0, frame, Progress(pos, None))
    everything = store.max_window_end()
    assert everything == {"a": T0 + 40 * HOUR, "b": T0 + 20 * HOUR}
    bound = T0 + 15 * HOUR
    assert store.max_window_end(bound, HOUR) == everything
    assert store.max_window_end(T0 + 25 * HOUR, HOUR) == {"a": T0 + 40 * HOUR}  # b ended before the bound
    assert store.max_window_end(T0 + 50 * HOUR, HOUR) == {}


def test_series_ends_reads_newest_days_first_and_only_as_far_as_needed(store_location: str) -> None:
    store = HistoryStore(store_location)
    day2 = windows(["a", "b"], [T0 + h * HOUR for h in range(24, 30)])  # the next day
    store.write_checkpoint(TOPIC, 0, FIRST, Progress(1, None))
    store.write_checkpoint(TOPIC, 0, windows(["c"], [T0 + 3 * HOUR]), Progress(2, None))
    store.write_checkpoint(TOPIC, 0, day2, Progress(3, None))
    ends = store.series_ends()
    assert len(ends.days) == 2
    assert ends.get(["a"]) == {"a": T0 + 30 * HOUR}
    assert len(ends.days) == 1  # the older day was not needed
    assert ends.get(["c", "new"]) == {"c": T0 + 4 * HOUR}  # a series never stored costs the rest, once
    assert ends.days == [] and ends.get(["other"]) == {}
    everything = store.max_window_end()
    assert ends.get(["b", "a"]) == {s: everything[s] for s in ("a", "b")}
