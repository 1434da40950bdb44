"""The ingestor's partition assignment against a real history store (no broker needed)."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline.config import load_settings
from pipeline.ingest.ingestor import Ingestor
from pipeline.store import HistoryStore, Progress
from tests.support.store import HOUR, T0, crash_while_moving, windows


def test_assign_after_a_crash_in_the_moves_sees_the_recovered_windows_as_closed(
    store_location: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint committed its progress record, then the process died before moving its files.
    # Replay after the restart must treat those windows as closed, or it would store them again.
    s = load_settings(
        env={
            "ROLLCAST_DATA_DIR": str(tmp_path),
            "ROLLCAST_STORAGE__HISTORY": store_location,
            "ROLLCAST_WINDOW__LENGTH_MS": str(HOUR),
        }
    )
    store = HistoryStore(s)
    store.write_checkpoint(s.topics.observations, 0, windows(["a"], [T0]), Progress(1, T0))
    crash_while_moving(
        store, s.topics.observations, 0, windows(["a"], [T0 + HOUR]), Progress(2, T0 + HOUR), monkeypatch
    )

    ingestor = Ingestor(s, consumer=None, producer=None, windows_partitions=1)  # assign() uses only the store
    try:
        ingestor.assign([0])
        run = ingestor.runs[0]
        assert run.replay_until == 2
        assert run.state.closed_until == {"a": T0 + 2 * HOUR}
    finally:
        ingestor.close()


def test_a_series_idle_past_the_recent_windows_is_looked_up_when_it_comes_back(tmp_path) -> None:
    """An assignment reads only the series stored near the partition's watermark; a series idle since long
    before is read when its next event comes, so its gap rows reach back to its last window exactly as in a
    process that never restarted."""
    import json

    from kafka.consumer.fetcher import ConsumerRecord

    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_WINDOW__LENGTH_MS": str(HOUR),
                           "ROLLCAST_WINDOW__LATENESS_MS": "0"})
    topic = s.topics.observations
    store = HistoryStore(s)
    store.write_checkpoint(topic, 0, windows(["idle"], [T0]), Progress(1, T0 + HOUR))
    store.write_checkpoint(topic, 0, windows(["busy"], [T0 + h * HOUR for h in range(1, 10)]),
                           Progress(10, T0 + 10 * HOUR))
    ingestor = Ingestor(s, consumer=None, producer=None, windows_partitions=1)
    try:
        ingestor.assign([0])
        state = ingestor.runs[0].state
        assert state.closed_until == {"busy": T0 + 10 * HOUR}  # only the recent series was read
        events = [{"series": "idle", "ts": T0 + 12 * HOUR + 5, "value": 1.0},
                  {"series": "busy", "ts": T0 + 14 * HOUR, "value": 2.0}]  # closes the hour of `idle`
        records = [ConsumerRecord(topic, 0, -1, 10 + i, 0, 0, e["series"].encode(), json.dumps(e).encode(), [],
                                  None, -1, -1, -1) for i, e in enumerate(events)]
        ingestor.process(0, records)
        closed = pl.concat(ingestor.runs[0].closed).filter(pl.col("series") == "idle")
    finally:
        ingestor.close()
    # gap rows for hours 1-11 (count 0), then the window of its event: as if no restart had happened
    assert closed["window_start"].to_list() == [T0 + h * HOUR for h in range(1, 13)]
    assert closed["count"].to_list() == [0] * 11 + [1]
