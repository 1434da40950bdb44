"""A frozen ("zombie") ingest process: SIGSTOP for longer than the consumer session timeout (a long GC
pause, a VM migration), its partitions taken over, then SIGCONT. Whatever it had in hand when it froze
must not reach the history store a second time: the store fences its late writes, and every window is
stored exactly once."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pytest

from pipeline.config import load_settings
from pipeline.processes import Child, free_port
from pipeline.store import HistoryStore
from tests.support import metric, scrape
from tests.support.ingest import (
    INGEST_ENV,
    WINDOW_KEYS,
    assert_frames_equal,
    child_log,
    exit_code_after_sigterm,
    make_observations,
    produce,
    reference,
    start_ingest,
    wait_for,
    window_faults,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault]

SESSION_TIMEOUT_MS = 3000
ZOMBIE_ENV = {
    "ROLLCAST_KAFKA__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
    "ROLLCAST_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
}
FREEZE_S = 6.0  # 2x the session timeout, and at least until the other process took over (below)
TAKEOVER_S = 30.0  # the longest a freeze waits for the other process to take over and checkpoint
PARTITIONS = {0, 1, 2}
SERIES = 8
BURST = 300  # observations per burst
BURST_EVERY_S = 0.5
SURGE = 4000  # the burst a process is frozen in the middle of, so that it has work in hand
FENCED = "rollcast_fenced_writes_total"
MESSAGES = "rollcast_ingest_messages_total"
_PARTITION_EVENT = re.compile(r"\b(assigned|revoked|lost) partition (\d+)\b")


class _Stream(threading.Thread):
    """Produces observations in bursts until :meth:`finish`, event time moving forward burst by burst."""

    def __init__(self, settings) -> None:
        super().__init__(name="observation-bursts", daemon=True)
        self.settings = settings
        self.sent: list[tuple[int, int, dict]] = []
        self.bursts = 0
        self.t = 1_700_000_000_000
        self.halt = threading.Event()
        self.surge = threading.Event()  # set: the next burst is a big one
        self.error: BaseException | None = None

    def burst(self) -> None:
        n = SURGE if self.surge.is_set() else BURST
        self.surge.clear()
        obs = make_observations(n, series=SERIES, seed=1000 + self.bursts, t0=self.t)
        self.sent += produce(self.settings, obs)
        self.bursts += 1
        self.t = max(o["ts"] for o in obs) + 1_500

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.burst()
                self.halt.wait(BURST_EVERY_S)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self) -> list[tuple[int, int, dict]]:
        """Stop after the burst in flight; return (partition, offset, observation) of all sent."""
        self.halt.set()
        self.join(60)
        assert not self.is_alive(), "the producing thread did not stop"
        if self.error is not None:
            raise AssertionError(f"producing observations failed: {self.error!r}") from self.error
        return self.sent



def _held(child: Child) -> set[int]:
    """The partitions ``child`` holds now, as its log tells (assigned, then revoked or lost)."""
    held: set[int] = set()
    for m in _PARTITION_EVENT.finditer(child_log(child)):
        (held.add if m.group(1) == "assigned" else held.discard)(int(m.group(2)))
    return held


def _shared(a: Child, b: Child) -> bool:
    """Both processes hold partitions, none twice, every one held."""
    ha, hb = _held(a), _held(b)
    return bool(ha) and bool(hb) and not ha & hb and ha | hb == PARTITIONS


def _eventually(condition, timeout_s: float) -> bool:
    try:
        wait_for(condition, timeout_s, "", interval=0.5)
    except AssertionError:
        return False
    return True


def _fenced(child: Child, port: int) -> int:
    """``rollcast_fenced_writes_total`` of a running process (0 while the counter does not exist); from
    its log (lines saying "fenced") if it no longer serves /metrics."""
    samples = scrape(port)
    if samples:
        return int(sum(v for (name, _), v in samples.items() if name == FENCED))
    return sum("fenced" in line.lower() for line in child_log(child).splitlines())


def _last_ends(store: HistoryStore) -> dict[str, int]:
    """The end of the newest stored window of every series (from the windows, whatever the progress
    records look like)."""
    df = store.read()
    return dict(df.group_by("series").agg(pl.col("window_end").max()).iter_rows()) if df.height else {}


def _zombie(frozen: Child, port: int, other: Child, store: HistoryStore, stream: _Stream,
            series_of: dict[int, set[str]]) -> float:
    """Freeze ``frozen`` (SIGSTOP) in the middle of a surge of observations, for FREEZE_S, and longer until
    ``other`` holds every partition and has stored windows of the frozen one's partitions past what was
    stored when it froze; thaw it (SIGCONT); wait until the two share the partitions again. Returns the
    seconds the takeover took."""
    mine = _held(frozen)
    assert mine, f"{frozen.name} holds no partition; log:\n{frozen.tail(20)}"
    series = set().union(*(series_of[p] for p in mine))
    seen = metric(port, MESSAGES)
    stream.surge.set()
    # frozen while it works through the surge: polls and a checkpoint in hand, windows closed but not stored
    wait_for(lambda: metric(port, MESSAGES) >= seen + SURGE // 10, 60,
             f"{frozen.name} to be busy with the surge; log:\n{frozen.tail(20)}", interval=0.02)
    os.killpg(frozen.pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        before = _last_ends(store)

        def taken_over() -> bool:
            if _held(other) != PARTITIONS:
                return False
            now = _last_ends(store)
            return all(now.get(x, -1) > before.get(x, -1) for x in series)

        wait_for(taken_over, TAKEOVER_S,
                 f"{other.name} to take over {sorted(mine)} of the frozen {frozen.name} and store their windows; "
                 f"its log:\n{other.tail(20)}", interval=0.5)
        took = time.monotonic() - start
        time.sleep(max(0.0, FREEZE_S - took))  # frozen for FREEZE_S at least, whatever the takeover took
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    wait_for(lambda: _shared(frozen, other), 60,
             f"{frozen.name} to rejoin after SIGCONT; its log:\n{frozen.tail(20)}\n{other.name}'s:\n{other.tail(20)}")
    return took


def _parquet_reads(root: str, want: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The ``day=*/`` Parquet files as plain readers see them (no rollcast code)."""
    pattern = os.path.join(root, "day=*", "*.parquet")
    files = sorted(glob.glob(pattern))
    assert files, f"no Parquet file matches {pattern}"

    def tidy(df: pl.DataFrame) -> pl.DataFrame:
        return df.select(want.columns).cast(dict(want.schema)).sort(WINDOW_KEYS)

    return {
        "pyarrow.dataset": tidy(pl.from_arrow(ds.dataset(files, format="parquet").to_table())),
        "polars": tidy(pl.read_parquet(pattern, hive_partitioning=False)),
    }


def test_frozen_processes_taken_over_then_thawed_store_every_window_once(settings3, test_env, tmp_path):
    """Two ``rollcast ingest`` processes share three partitions while observations stream in. Each in
    turn is frozen (SIGSTOP) past the session timeout, the other takes its partitions over, and it is
    thawed (SIGCONT) with windows and a position it no longer owns. The store must fence what the zombie
    writes then: every window exactly once, exact, and the fence counted."""
    s = load_settings(env={**test_env, **INGEST_ENV, **ZOMBIE_ENV})
    store = HistoryStore(s)
    env = {**test_env, **ZOMBIE_ENV}
    ports = {"ingest-a": free_port(), "ingest-b": free_port()}
    a = start_ingest(env, tmp_path, "ingest-a", ports["ingest-a"])
    b = start_ingest(env, tmp_path, "ingest-b", ports["ingest-b"])
    stream = _Stream(s)
    started = time.monotonic()
    try:
        wait_for(lambda: _shared(a, b), 60, f"both processes to be assigned partitions; logs:\n{a.tail(10)}\n"
                 f"{b.tail(10)}")
        stream.start()
        wait_for(lambda: stream.sent, 60, "the first burst")
        series_of = {p: {o["series"] for q, _, o in list(stream.sent) if q == p} for p in PARTITIONS}
        assert all(series_of.values()), f"a partition got no series: {series_of}"
        wait_for(lambda: set(_last_ends(store)) >= set().union(*series_of.values()), 60,
                 "windows of every partition in the store", interval=0.5)
        took_a = _zombie(a, ports["ingest-a"], b, store, stream, series_of)
        took_b = _zombie(b, ports["ingest-b"], a, store, stream, series_of)
        sent = stream.finish()
        # the last burst, after both pauses
        sent += produce(s, make_observations(BURST, series=SERIES, seed=999, t0=stream.t))
        assert {p for p, _, _ in sent} == PARTITIONS
        want = reference(sent)
        keys = want.select(WINDOW_KEYS)
        caught_up = _eventually(lambda: keys.join(store.read().select(WINDOW_KEYS), on=WINDOW_KEYS,
                                                  how="anti").height == 0, 60)
        fenced = {name: _fenced(child, ports[name]) for name, child in (("ingest-a", a), ("ingest-b", b))}
        for child in (a, b):  # SIGTERM both at once: neither is handed the other's partitions on the way out
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
        # one SIGTERM each: Child.stop would send another, which a process already in interpreter shutdown
        # (its handlers gone) dies of (-15)
        codes = {"ingest-a": exit_code_after_sigterm(a), "ingest-b": exit_code_after_sigterm(b)}
    finally:
        stream.halt.set()
        for child in (a, b):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGCONT)
            child.stop()
    wall = time.monotonic() - started

    got = store.read()
    faults = window_faults(got, want)
    plain = _parquet_reads(str(Path(store.root)), want)
    plain_faults = {reader: window_faults(df, want) for reader, df in plain.items()}
    total_fenced = sum(fenced.values())
    print(f"FAULTS ingest_zombie: windows_lost={faults['lost']} windows_duplicated={faults['duplicated']} "
          f"windows_wrong={faults['wrong']} fenced_writes={total_fenced}", flush=True)
    detail = (f"windows={want.height} observations={len(sent)} HistoryStore.read: {faults} "
              + " ".join(f"{r}: {f}" for r, f in plain_faults.items())
              + f" fenced={fenced} exit={codes} takeover_s=({took_a:.1f}, {took_b:.1f}) wall_s={wall:.0f}")
    logs = f"\ningest-a:\n{a.tail(15)}\ningest-b:\n{b.tail(15)}"
    assert caught_up, f"some windows never reached the store ({detail}){logs}"
    none = {"lost": 0, "duplicated": 0, "wrong": 0, "unexpected": 0}
    assert faults == none and all(f == none for f in plain_faults.values()), (
        f"the history store after two zombies: {detail}{logs}")
    assert_frames_equal(got, want)
    for df in plain.values():
        assert_frames_equal(df, want)
    assert total_fenced > 0, (
        f"no write was fenced ({FENCED} summed over both processes is 0, per process {fenced}): the zombies' "
        f"late writes were not stopped by a fence, or the counter does not exist ({detail})")
    assert codes == {"ingest-a": 0, "ingest-b": 0}, f"exit codes {codes}{logs}"
