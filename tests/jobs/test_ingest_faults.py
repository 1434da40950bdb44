"""kill -9 and rebalances: every window ends in the history store exactly once."""

from __future__ import annotations

import os
import random
import signal

import pytest

from pipeline.config import load_settings
from pipeline.store import HistoryStore
from tests.jobs.ingest_support import (
    INGEST_ENV,
    assert_frames_equal,
    ingest_child,
    make_observations,
    produce,
    reference,
    wait_exit,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _progress_files(s) -> int:
    d = s.history_dir / "_progress"
    return sum(f.stat().st_mtime_ns for f in d.glob("*.json")) if d.is_dir() else 0


def test_kill9_at_random_points_then_restart_stores_every_window_once(settings, test_env, tmp_path):
    s = load_settings(env={**test_env, **INGEST_ENV})
    sent = produce(s, make_observations(12_000, series=8, seed=3))
    rng = random.Random(7)
    for i in range(3):
        before = _progress_files(s)
        child = ingest_child(test_env, tmp_path, f"ingest-{i}")
        # kill once it has checkpointed something new, at a random moment after that
        wait_for(lambda b=before: _progress_files(s) != b, 60, "a checkpoint")
        deadline_checks = rng.randint(0, 6)
        for _ in range(deadline_checks):
            b2 = _progress_files(s)
            wait_for(lambda b=b2, c=child: _progress_files(s) != b or not c.alive(), 30, "another checkpoint")
        os.killpg(child.pid, signal.SIGKILL)
        child.proc.wait()
    final = ingest_child(test_env, tmp_path, "ingest-final", "--exit-when-idle", "2")
    assert wait_exit(final, 90) == 0, final.tail(30)
    assert_frames_equal(HistoryStore(s).read(), reference(sent))


def test_two_processes_one_stopped_mid_stream_lose_nothing(settings, test_env, tmp_path):
    s = load_settings(env={**test_env, **INGEST_ENV})
    sent = produce(s, make_observations(12_000, series=8, seed=5))
    a = ingest_child(test_env, tmp_path, "ingest-a", "--exit-when-idle", "3")
    # b's idle exit must outlast the rebalance that hands it a's partitions (slow on a loaded machine)
    b = ingest_child(test_env, tmp_path, "ingest-b", "--exit-when-idle", "10")
    wait_for(lambda: _progress_files(s) != 0, 60, "a checkpoint")
    a.stop(timeout_s=30)  # SIGTERM mid-stream: b takes over a's partitions
    assert a.proc.returncode == 0, a.tail(30)
    assert wait_exit(b, 90) == 0, b.tail(30)
    assert_frames_equal(HistoryStore(s).read(), reference(sent))
