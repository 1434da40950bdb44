"""kill -9 and rebalances: every window ends in the history store exactly once (local and S3)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from pipeline.config import load_settings
from pipeline.store import HistoryStore
from tests.support.ingest import (
    INGEST_ENV,
    assert_frames_equal,
    checkpoints,
    ingest_child,
    make_observations,
    produce,
    progress_positions,
    reference,
    wait_exit,
    wait_for,
    window_faults,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _kill9_restart_check(test_env: dict[str, str], tmp_path, n_obs: int, kills: int, seed: int) -> None:
    """Ingest ``n_obs`` observations, SIGKILL the job ``kills`` times at random checkpoints, run it
    to the end, and compare the store with the reference."""
    s = load_settings(env={**test_env, **INGEST_ENV})
    store = HistoryStore(s)
    sent = produce(s, make_observations(n_obs, series=8, seed=seed))
    rng = random.Random(seed + 4)
    for i in range(kills):
        before = checkpoints(store)
        child = ingest_child(test_env, tmp_path, f"ingest-{i}")
        try:
            # kill once it has checkpointed something new, at a random moment after that
            wait_for(lambda b=before: checkpoints(store) != b, 60, "a checkpoint")
            for _ in range(rng.randint(0, 6)):
                b2 = checkpoints(store)
                wait_for(lambda b=b2, c=child: checkpoints(store) != b or not c.alive(), 30, "another checkpoint")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.proc.wait()
    final = ingest_child(test_env, tmp_path, "ingest-final", "--exit-when-idle", "2")
    try:
        assert wait_exit(final, 90) == 0, final.tail(30)
    finally:
        final.stop()
    assert_frames_equal(store.read(), reference(sent))


def test_kill9_at_random_points_then_restart_stores_every_window_once(settings, test_env, tmp_path):
    _kill9_restart_check(test_env, tmp_path, n_obs=8_000, kills=2, seed=3)


def test_kill9_with_the_store_on_s3_stores_every_window_once(settings, test_env, tmp_path, s3_uri):
    # Same faults with the history store in a bucket of a real S3 server: progress records are
    # single PUTs and moves are copy + delete (see pipeline/store.py).
    # A short session timeout lets the restarted consumer take over the killed one's partitions sooner.
    env = {**test_env, "ROLLCAST_STORAGE__HISTORY": s3_uri, "ROLLCAST_KAFKA__SESSION_TIMEOUT_MS": "3000"}
    _kill9_restart_check(env, tmp_path, n_obs=6_000, kills=2, seed=11)


def test_two_processes_one_stopped_mid_stream_lose_nothing(settings, test_env, tmp_path):
    s = load_settings(env={**test_env, **INGEST_ENV})
    sent = produce(s, make_observations(12_000, series=8, seed=5))
    a = ingest_child(test_env, tmp_path, "ingest-a", "--exit-when-idle", "3")
    # b's idle exit must outlast the rebalance that hands it a's partitions (slow on a loaded machine)
    b = ingest_child(test_env, tmp_path, "ingest-b", "--exit-when-idle", "10")
    wait_for(lambda: checkpoints(HistoryStore(s)) != (), 60, "a checkpoint")
    a.stop(timeout_s=30)  # SIGTERM mid-stream: b takes over a's partitions
    assert a.proc.returncode == 0, a.tail(30)
    assert wait_exit(b, 90) == 0, b.tail(30)
    assert_frames_equal(HistoryStore(s).read(), reference(sent))


def test_a_store_that_fails_for_a_while_loses_nothing(settings, test_env, tmp_path):
    """The history store refuses writes for a while (a file where its staging directory goes: the same
    OSError from pyarrow as an S3 outage or a full disk). Ingest says so and keeps running, retrying from
    what is durable; once the store is back every window is stored exactly once."""
    s = load_settings(env={**test_env, **INGEST_ENV})
    store = HistoryStore(s)
    first = make_observations(4_000, series=8, seed=7)
    sent = produce(s, first)
    child = ingest_child(test_env, tmp_path, "ingest")
    try:
        wait_for(lambda: checkpoints(store) != (), 60, "a checkpoint")
        pending, away = Path(store.root) / "_pending", tmp_path / "pending-away"
        with _frozen(child):  # a checkpoint writing there now fails as well
            pending.mkdir(exist_ok=True)  # made by the first checkpoint that staged windows
            os.rename(pending, away)
            pending.write_bytes(b"")
        sent += produce(s, make_observations(4_000, series=8, seed=8, t0=max(o["ts"] for o in first) + 10_000))
        wait_for(lambda: "history store error in the ingest loop" in child.tail(400), 60,
                 f"ingest to report the store's error; log:\n{child.tail(30)}")
        stored = store.read().height
        time.sleep(3.0)  # the job stays up while the store fails (it used to exit with the store's error)
        assert child.alive(), child.tail(30)
        assert store.read().height == stored, "windows were written while the store failed"
        # The store comes back with what it held: staged files a committed progress record names are
        # moved into the dataset by the next recover. (Without them those windows would be gone: lost
        # and then stored as gaps, which no real outage does.) Frozen, so that no retry sees the store
        # half restored.
        with _frozen(child):
            pending.unlink()
            os.rename(away, pending)
        want = reference(sent)
        wait_for(lambda: store.read().height >= want.height, 90, f"every window in the store; log:\n{child.tail(30)}")
        assert child.stop(timeout_s=30) == 0, child.tail(30)
    finally:
        child.stop()
    assert_frames_equal(store.read(), want)


@contextlib.contextmanager
def _frozen(child):
    """SIGSTOP the child's process group for the block (it takes no step while the test rearranges the
    store), SIGCONT after."""
    os.killpg(child.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(child.pid, signal.SIGCONT)


def _assigned_rounds(log: str) -> list[set[int]]:
    """The partitions of each assignment an ingest process logged, in order (a revoke ends a round)."""
    rounds: list[set[int]] = []
    current: set[int] | None = None
    for line in log.splitlines():
        if "revoked partition" in line:
            current = None
        elif m := re.search(r"assigned partition (\d+) ", line):
            if current is None:
                current = set()
                rounds.append(current)
            current.add(int(m.group(1)))
    return rounds


def test_partitions_kept_through_a_join_and_a_leave_keep_their_open_windows(settings3, test_env, tmp_path):
    """Issue 18: ingest A reads everything, leaving the last window of every series open; B joins the
    group, then leaves. A keeps some partitions through both rebalances (kafka-python keeps their fetch
    position), B rebuilds the partition it is given from the committed safe offset. Then one later
    observation per series closes every open window: each one must be in the store, exact, once."""
    s = load_settings(env={**test_env, **INGEST_ENV})
    store = HistoryStore(s)
    first = make_observations(3_000, series=6, seed=18)
    sent = produce(s, first)
    assert {p for p, _, _ in sent} == {0, 1, 2}
    ends = {p: max(off for q, off, _ in sent if q == p) + 1 for p in range(3)}
    a = ingest_child(test_env, tmp_path, "ingest-a")
    b = None
    try:
        wait_for(lambda: progress_positions(store, s.topics.observations, 3) == ends, 60, "A to read everything")
        open_before = reference(sent)  # what is closed now; the last window of every series is still open
        wait_for(lambda: store.read().height >= open_before.height, 30, "A's windows in the store")
        b = ingest_child(test_env, tmp_path, "ingest-b")
        wait_for(lambda: len(_assigned_rounds(a.log_path.read_text())) >= 2 and "assigned partition" in b.tail(200),
                 60, "B to join and A to be assigned again")
        kept = _assigned_rounds(a.log_path.read_text())[1]
        assert kept and kept != {0, 1, 2}, _assigned_rounds(a.log_path.read_text())
        assert b.stop(timeout_s=30) == 0, b.tail(30)  # B leaves: A is given every partition again
        wait_for(lambda: _assigned_rounds(a.log_path.read_text())[-1:] == [{0, 1, 2}]
                 and len(_assigned_rounds(a.log_path.read_text())) >= 3, 60, "A to own every partition again")
        # the stream goes on: one later observation per series closes every window left open
        t_end = max(o["ts"] for o in first) + 5_000
        series = sorted({o["series"] for o in first})
        sent += produce(s, [{"series": x, "ts": t_end + i, "value": 1.0} for i, x in enumerate(series)])
        want = reference(sent)
        assert want.height > open_before.height
        ends = {p: max(off for q, off, _ in sent if q == p) + 1 for p in range(3)}
        wait_for(lambda: progress_positions(store, s.topics.observations, 3) == ends or not a.alive(), 60,
                 f"A to read the later observations; log:\n{a.tail(30)}")
        done = checkpoints(store)  # the next checkpoint starts after that one's files were moved
        wait_for(lambda: checkpoints(store) != done or not a.alive(), 30, "one more checkpoint")
        assert a.alive(), a.tail(30)
        got = store.read()
        faults = window_faults(got, want)
        print(f"REBALANCE kept={sorted(kept)} windows={want.height} {faults}", flush=True)
        assert faults == {"lost": 0, "duplicated": 0, "wrong": 0, "unexpected": 0}, faults
        assert_frames_equal(got, want)
    finally:
        if b is not None:
            b.stop()
        a.stop()
