"""A topic deleted and created again under a running `rollcast ingest` (Kafka gives it a new topic ID and
offsets from 0): the job reads the new topic from its beginning instead of resuming after the old
topic's offsets, so no observation of the new topic is skipped (real broker, real job process)."""

from __future__ import annotations

import time

import polars as pl
import pytest

from pipeline.config import load_settings
from pipeline.kafka.clients import ensure_topics, make_admin
from pipeline.store import HistoryStore
from tests.support.ingest import (
    INGEST_ENV,
    assert_frames_equal,
    ingest_child,
    make_observations,
    produce,
    progress_positions,
    reference,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault]

GAPS = {"ROLLCAST_WINDOW__MAX_GAP_WINDOWS": "10"}  # the pause between the topics is no gap to fill


def _ends(sent: list) -> dict[int, int]:
    return {p: max(off for q, off, _ in sent if q == p) + 1 for p in {p for p, _, _ in sent}}


def test_a_topic_created_again_under_a_running_ingest_is_read_from_its_beginning(settings, test_env, tmp_path):
    env = {**test_env, **GAPS}
    s = load_settings(env={**env, **INGEST_ENV})
    store, topic = HistoryStore(s), s.topics.observations
    first = produce(s, make_observations(4_000, series=6, seed=31))
    child = ingest_child(env, tmp_path, "ingest")
    try:
        wait_for(lambda: progress_positions(store, topic, s.kafka.partitions) == _ends(first), 90,
                 f"ingest to read the first topic; log:\n{child.tail(20)}")
        stored_first = store.read()
        assert_frames_equal(stored_first, reference(first))

        admin = make_admin(s)
        try:
            admin.delete_topics([topic])
            wait_for(lambda: topic not in admin.list_topics(), 30, "the topic to be deleted")
        finally:
            admin.close()
        time.sleep(1.0)
        ensure_topics(s, [topic])
        t1 = max(o["ts"] for _, _, o in first) + 60_000
        # fewer records than before: the new topic's offsets all lie below the old progress records' positions,
        # so a job that resumed after those would skip every one of them
        second = produce(s, make_observations(1_500, series=6, seed=32, t0=t1))
        assert all(end < _ends(first)[p] for p, end in _ends(second).items())
        wait_for(lambda: progress_positions(store, topic, s.kafka.partitions) == _ends(second), 120,
                 f"ingest to read the new topic from its beginning; log:\n{child.tail(30)}")
        assert child.stop(timeout_s=30) == 0, child.tail(30)
    finally:
        child.stop()
    log = child.tail(2000)
    assert "reading it from its beginning" in log or "deleted and created again" in log, log[-3000:]
    want = pl.concat([stored_first, reference(second)]).sort("series", "window_start")
    got = store.read()
    new = got.filter(pl.col("window_start") >= t1 - 1000)
    print(f"FAULTS topic_recreated: observations_new_topic={len(second)} "
          f"counted_in_new_windows={int(new['count'].sum())} windows={got.height}")
    assert_frames_equal(got, want)
