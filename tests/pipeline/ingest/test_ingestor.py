"""The ingestor's partition assignment against a real history store (no broker needed)."""

from __future__ import annotations

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
