"""A frozen ("zombie") forecast process: SIGSTOP for longer than the consumer session timeout (a long GC
pause, a VM migration), its windows partitions taken over, then SIGCONT. Whatever it had processed and not
saved when it froze must not reach the history store: the store fences its late save of the scoring and
calibration state, it drops that state and rejoins, and the new owner's state is never replaced by the
zombie's. Every forecast and score is on its topic, every repeat carries the values first published, and
the calibration learned equals that of a run that was never paused.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import models
from pipeline.config import Settings, load_settings
from pipeline.processes import Child, free_port
from pipeline.store import HistoryStore, Progress
from pipeline.windows import WINDOW_SCHEMA
from tests.support import healthz, metric, read_topic, scrape, wait_for
from tests.support.forecast import STEP, H, L, produce_windows
from tests.support.ingest import (
    INGEST_ENV,
    child_log,
    exit_code_after_sigterm,
    job_env,
    start_forecast,
    start_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault]

SESSION_TIMEOUT_MS = 3000
ZOMBIE_ENV = {
    "ROLLCAST_KAFKA__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
    "ROLLCAST_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
    # no periodic save within the test: a process saves its scoring state only when partitions are revoked
    # (every rebalance) and when it stops, so a process frozen after processing a batch always holds work
    # that is processed and published but not saved, and its late save of it is what the fence must refuse
    "ROLLCAST_SCORING__CHECKPOINT_S": "3600",
}
FREEZE_S = 6.0  # 2x the session timeout, and at least until the other process took over (below)
TAKEOVER_S = 45.0  # the longest a freeze waits for the other process to take over and work
PARTITIONS = {0, 1, 2}
SERIES = [f"z{i}" for i in range(9)]  # 2, 2 and 5 series in windows partitions 0, 1 and 2
BURST = 3  # windows per series per burst
SURGE = 30  # windows per series of the burst a process is frozen in the middle of
BURST_EVERY_S = 0.5
T0 = 1_700_000_000_000
FENCED = "rollcast_fenced_writes_total"
WINDOWS_IN = "rollcast_forecast_windows_total"
VOLATILE = ("issued_at",)  # a forecast redone from a saved state is issued anew (models/scoring/scorer.py)
TOLERANCE = 1e-9  # relative, for numbers in messages, and absolute for calibration offsets
_PARTITION_EVENT = re.compile(r"\b(assigned|revoked) partitions \[([\d, ]*)\]")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return models.save_model(models.create_model("tcn", context=L, horizon=H, seed=3), tmp_path / "model")


# ----------------------------------------------------------------------------- windows


def grid(first: int, n: int) -> pl.DataFrame:
    """Windows ``first`` to ``first + n - 1`` of every series on the regular grid, in window order, a gap
    (count 0) now and then."""
    rows = []
    for i in range(first, first + n):
        ws = T0 + i * STEP
        for j, s in enumerate(SERIES):
            gap = (i + 11 * j) % 37 == 20
            v = 10 * (j + 1) + math.sin(i / 3) * (j + 1) + ((i * 7919 + j * 104729) % 1000) / 1000 - 0.5
            rows.append({"series": s, "window_start": ws, "window_end": ws + STEP, "count": 0 if gap else 3,
                         "first": None if gap else v, "last": None if gap else v, "min": None if gap else v - 1,
                         "max": None if gap else v + 1, "mean": None if gap else v, "sum": None if gap else 3 * v})
    return pl.DataFrame(rows, schema=WINDOW_SCHEMA)


class _Stream(threading.Thread):
    """Windows in bursts until :meth:`finish`, as ingest hands them on: each burst stored in the history
    store, then produced to the windows topic."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="window-bursts", daemon=True)
        self.settings = settings
        self.store = HistoryStore(settings)
        self.sent: list[pl.DataFrame] = []
        self.next = 0
        self.halt = threading.Event()
        self.surge = threading.Event()  # set: the next burst is a big one
        self.error: BaseException | None = None

    def burst(self, n: int | None = None) -> None:
        if n is None:
            n = SURGE if self.surge.is_set() else BURST
            self.surge.clear()
        windows = grid(self.next, n)
        self.store.write_checkpoint("seed", 0, windows, Progress(len(self.sent) + 1, None))
        produce_windows(self.settings, windows)
        self.sent.append(windows)
        self.next += n

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.burst()
                self.halt.wait(BURST_EVERY_S)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self) -> None:
        """Stop after the burst in flight."""
        self.halt.set()
        self.join(60)
        assert not self.is_alive(), "the producing thread did not stop"
        if self.error is not None:
            raise AssertionError(f"producing windows failed: {self.error!r}") from self.error

    @property
    def windows(self) -> pl.DataFrame:
        return pl.concat(self.sent)


def forecastable(windows: pl.DataFrame, target: str = "mean") -> set[tuple[str, int]]:
    """(series, window_end) of every window the forecast job can forecast: a full context of L windows on
    the regular grid whose first value is not a gap (as tests/test_faults.py counts them)."""
    out = set()
    for (s,), part in windows.sort("window_start").group_by("series", maintain_order=True):
        counts, ends, vals = part["count"].to_numpy(), part["window_end"].to_numpy(), part[target].to_numpy()
        for i in range(L - 1, part.height):
            regular = ends[i] - ends[i - L + 1] == (L - 1) * (ends[1] - ends[0] if part.height > 1 else 0)
            if regular and counts[i - L + 1] > 0 and not np.isnan(vals[i - L + 1]):
                out.add((s, int(ends[i])))
    return out


def settled(expected: set[tuple[str, int]], windows: pl.DataFrame) -> set[tuple[str, int]]:
    """The forecasts of ``expected`` whose H windows have all arrived: each must have its score."""
    last = dict(windows.group_by("series").agg(pl.col("window_end").max()).iter_rows())
    return {(s, end) for s, end in expected if end + H * STEP <= last[s]}


# ----------------------------------------------------------------------------- processes



def _held(child: Child) -> set[int]:
    """The windows partitions ``child`` holds now, as its log tells (assigned, then revoked)."""
    held: set[int] = set()
    for m in _PARTITION_EVENT.finditer(child_log(child)):
        parts = {int(p) for p in m.group(2).replace(",", " ").split()}
        held = held | parts if m.group(1) == "assigned" else held - parts
    return held


def _shared(a: Child, b: Child) -> bool:
    """Both processes hold partitions, none twice, every one held."""
    ha, hb = _held(a), _held(b)
    return bool(ha) and bool(hb) and not ha & hb and ha | hb == PARTITIONS


def _fenced(child: Child, port: int) -> tuple[int, int]:
    """``rollcast_fenced_writes_total`` of a running process (0 while the counter does not exist; from its
    log when it serves no /metrics), and its log lines saying a partition "was fenced"."""
    lines = sum("was fenced" in line for line in child_log(child).splitlines())
    samples = scrape(port)
    if not samples:
        return lines, lines
    return int(sum(v for (name, _), v in samples.items() if name == FENCED)), lines



def _zombie(frozen: Child, fport: int, other: Child, oport: int, stream: _Stream) -> float:
    """Freeze ``frozen`` (SIGSTOP) while it works through a surge of windows, for FREEZE_S, and longer until
    ``other`` holds every partition and has processed windows since; thaw it (SIGCONT); wait until the two
    share the partitions again. Returns the seconds the takeover took."""
    mine = _held(frozen)
    assert mine and frozen.alive(), f"{frozen.name} holds no partition; log:\n{frozen.tail(20)}"
    seen = metric(fport, WINDOWS_IN)
    stream.surge.set()
    # frozen with the surge in hand: processed and published since its last save, not saved
    wait_for(lambda: metric(fport, WINDOWS_IN) >= seen + 20, 60,
             f"{frozen.name} to be busy with the surge; log:\n{frozen.tail(20)}", interval=0.02)
    os.killpg(frozen.pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        wait_for(lambda: _held(other) == PARTITIONS, TAKEOVER_S,
                 f"{other.name} to take over {sorted(mine)} of the frozen {frozen.name}; its log:\n{other.tail(20)}",
                 interval=0.2)
        took = time.monotonic() - start
        at = metric(oport, WINDOWS_IN)
        wait_for(lambda: metric(oport, WINDOWS_IN) > at, TAKEOVER_S,
                 f"{other.name} to process windows after the takeover; its log:\n{other.tail(20)}", interval=0.2)
        time.sleep(max(0.0, FREEZE_S - (time.monotonic() - start)))  # frozen for FREEZE_S at least
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    wait_for(lambda: _shared(frozen, other), 60,
             f"{frozen.name} to rejoin after SIGCONT; its log:\n{frozen.tail(20)}\n{other.name}'s:\n{other.tail(20)}")
    return took


# ----------------------------------------------------------------------------- topics and states


def _collect(settings: Settings, topic: str, expected: set[tuple[str, int]] | None, timeout: float
             ) -> dict[tuple[str, int], list[dict]]:
    """Every message of ``topic`` by (series, last_window_end), repeats kept: read until ``expected`` is
    covered (by ``timeout``), or with ``expected`` None until the topic is quiet."""
    seen: dict[tuple[str, int], list[dict]] = {}
    read = [0]

    def take(records: list) -> None:
        for rec in records[read[0]:]:
            msg = json.loads(rec.value)
            seen.setdefault((msg["series"], msg["last_window_end"]), []).append(msg)
        read[0] = len(records)

    def covered(records: list) -> bool:
        take(records)
        return expected <= seen.keys()

    if expected is None:
        take(read_topic(settings, topic, timeout=timeout, quiet_s=2.0))
    else:
        read_topic(settings, topic, covered, timeout=timeout)
    return seen


def _close(a: object, b: object) -> bool:
    """JSON values equal, numbers within TOLERANCE (relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
    return a == b


def _values(msg: dict) -> dict:
    return {k: v for k, v in msg.items() if k not in VOLATILE}


def _repeats_differing(by_key: dict[tuple[str, int], list[dict]]) -> tuple[int, int, list]:
    """Keys published more than once whose repeats differ from the first (beyond VOLATILE fields); keys
    repeated; a few examples."""
    bad = [(k, msgs) for k, msgs in by_key.items() if any(not _close(_values(m), _values(msgs[0])) for m in msgs)]
    return len(bad), sum(len(m) > 1 for m in by_key.values()), bad[:3]


def _issued_anew(by_key: dict[tuple[str, int], list[dict]]) -> int:
    """Keys published more than once with more than one ``issued_at`` (redone from a saved state)."""
    return sum(len({m.get("issued_at") for m in msgs}) > 1 for msgs in by_key.values())


def _differing(ours: dict[tuple[str, int], list[dict]], ref: dict[tuple[str, int], list[dict]],
               keys: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """Keys of ``keys`` whose message differs between two runs (missing from either counts)."""
    return sorted(k for k in keys if k not in ours or k not in ref
                  or not _close(_values(ours[k][0]), _values(ref[k][0])))


def _state(settings: Settings, group: str, partition: int) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """The saved scoring state of a windows partition (ForecastCheckpoint.name): the offset it covers, and
    per series its calibration state (flattened) and settled-window counts ``(H,)``."""
    data = HistoryStore(settings).read_state(f"forecast/{group}/{settings.topics.windows}-{partition}.npz")
    if data is None:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        # the whole calibration state of each series: experts, weights and guard, and its settled windows
        return int(meta["offset"]), {s: (np.concatenate([z["cal_experts"][i].ravel(), z["cal_weights"][i].ravel(),
                                                         z["cal_guard"][i].ravel()]), z["cal_updates"][i].copy())
                                     for i, s in enumerate(meta["series"])}


def _calibration_differing(ours: Settings, ref: Settings) -> tuple[int, list[str]]:
    """Series (or partitions without a state) whose saved calibration differs between the two runs."""
    bad = []
    for p in sorted(PARTITIONS):
        a, b = _state(ours, ours.groups.forecast, p), _state(ref, ref.groups.forecast, p)
        if a is None or b is None:
            bad.append(f"partition {p}: no saved state ({'zombie run' if a is None else 'reference'})")
            continue
        if a[0] != b[0]:
            bad.append(f"partition {p}: covers offset {a[0]}, the reference's {b[0]}")
        for s in sorted(a[1].keys() | b[1].keys()):
            if s not in a[1] or s not in b[1]:
                bad.append(f"partition {p} series {s}: only in {'the reference' if s in b[1] else 'the zombie run'}")
                continue
            (oa, ua), (ob, ub) = a[1][s], b[1][s]
            if oa.shape != ob.shape or not np.allclose(oa, ob, rtol=0, atol=TOLERANCE) or not np.array_equal(ua, ub):
                diff = float(np.max(np.abs(oa - ob))) if oa.shape == ob.shape else float("nan")
                bad.append(f"partition {p} series {s}: offsets differ by up to {diff:.3g}, "
                           f"updates {ua.tolist()} vs {ub.tolist()}")
    return len(bad), bad


# ----------------------------------------------------------------------------- the test


def test_frozen_forecast_processes_are_fenced_and_publish_what_an_unpaused_run_does(
        settings3, test_env, tmp_path, model_dir):
    """Two ``rollcast forecast`` processes with live scoring share three windows partitions while windows
    stream in. Each in turn is frozen (SIGSTOP) past the session timeout with processed, unsaved work in
    hand, the other takes its partitions over, and it is thawed (SIGCONT). Then: no forecast or score
    missing, every repeat identical, the zombies' late saves fenced, and the saved calibration and the
    scores equal those of one forecast process that read the same windows without a pause."""
    s = load_settings(env={**test_env, **INGEST_ENV})
    base = {**test_env, **ZOMBIE_ENV}
    ports = {"forecast-a": free_port(), "forecast-b": free_port()}
    a = start_forecast(base, tmp_path, "forecast-a", ports["forecast-a"], model_dir)
    b = start_forecast(base, tmp_path, "forecast-b", ports["forecast-b"], model_dir)
    stream = _Stream(s)
    ref = None
    suffix = uuid.uuid4().hex[:8]
    ref_env = {**test_env, "ROLLCAST_DATA_DIR": str(tmp_path / "reference-data"),
               "ROLLCAST_GROUPS__FORECAST": f"{s.groups.forecast}-reference",
               "ROLLCAST_TOPICS__FORECASTS": f"{s.topics.forecasts}-ref-{suffix}",
               "ROLLCAST_TOPICS__SCORES": f"{s.topics.scores}-ref-{suffix}"}
    rs = load_settings(env={**ref_env, **INGEST_ENV})
    started = time.monotonic()
    try:
        wait_for(lambda: _shared(a, b), 120, f"both processes to be assigned partitions; logs:\n{a.tail(10)}\n"
                 f"{b.tail(10)}", interval=0.5)
        stream.start()
        wait_for(lambda: all(metric(p, WINDOWS_IN) > 0 for p in ports.values()), 60,
                 f"both processes to forecast windows; logs:\n{a.tail(10)}\n{b.tail(10)}")
        took_a = _zombie(a, ports["forecast-a"], b, ports["forecast-b"], stream)
        took_b = _zombie(b, ports["forecast-b"], a, ports["forecast-a"], stream)
        stream.finish()
        stream.burst(2 * H)  # the last burst, after both pauses
        windows = stream.windows
        expected = forecastable(windows)
        scored = settled(expected, windows)
        _collect(s, s.topics.forecasts, expected, 90)
        _collect(s, s.topics.scores, scored, 90)
        health = {name: healthz(port)[0] for name, port in ports.items()}
        fenced = {name: _fenced(child, ports[name]) for name, child in (("forecast-a", a), ("forecast-b", b))}
        for child in (a, b):  # SIGTERM both at once: neither is handed the other's partitions on the way out
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
        codes = {name: exit_code_after_sigterm(child) for name, child in (("forecast-a", a), ("forecast-b", b))}
        zombie_wall = time.monotonic() - started

        # the reference: one process, another group and history store, the same windows, no pause
        HistoryStore(rs).write_checkpoint("seed", 0, windows, Progress(1, None))
        rport = free_port()
        ref = start_job("forecast-ref", job_env(ref_env, rport), tmp_path / "forecast-ref.log", "forecast",
                        "--model-dir", str(model_dir), "--exit-when-idle", "5")
        forecasts = _collect(s, s.topics.forecasts, None, 60)  # all, repeats kept, while the reference runs
        scores = _collect(s, s.topics.scores, None, 60)
        wait_for(lambda: not ref.alive(), 180, f"the reference run to finish; its log:\n{ref.tail(20)}", interval=0.5)
        codes["forecast-ref"] = ref.proc.returncode
        ref_forecasts = _collect(rs, rs.topics.forecasts, expected, 30)
        ref_scores = _collect(rs, rs.topics.scores, scored, 30)
    finally:
        stream.halt.set()
        for child in (a, b):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGCONT)
            child.stop()
        if ref is not None:
            ref.stop()
        _delete_topics(rs)
    wall = time.monotonic() - started

    forecasts_missing = expected - forecasts.keys()
    scores_missing = scored - scores.keys()
    fc_bad, fc_repeated, fc_examples = _repeats_differing(forecasts)
    sc_bad, sc_repeated, sc_examples = _repeats_differing(scores)
    calibration_bad, calibration_detail = _calibration_differing(s, rs)
    ref_missing = (expected - ref_forecasts.keys()) | (scored - ref_scores.keys())
    scores_vs_ref = _differing(scores, ref_scores, scored)
    forecasts_vs_ref = _differing(forecasts, ref_forecasts, expected)
    total_fenced = sum(m for m, _ in fenced.values())
    print(f"FAULTS forecast_zombie: forecasts_missing={len(forecasts_missing)} scores_missing={len(scores_missing)} "
          f"repeats_differing={fc_bad + sc_bad} calibration_differing={calibration_bad} fenced_writes={total_fenced}",
          flush=True)
    detail = (f"windows={windows.height} forecasts={len(expected)} scores={len(scored)} "
              f"repeated forecasts/scores={fc_repeated}/{sc_repeated} differing={fc_bad}/{sc_bad} "
              f"issued anew={_issued_anew(forecasts)}/{_issued_anew(scores)} "
              f"differing from the reference: scores={len(scores_vs_ref)} forecasts={len(forecasts_vs_ref)} "
              f"reference missing={len(ref_missing)} fenced (metric, log lines)={fenced} health={health} "
              f"exit={codes} takeover_s=({took_a:.1f}, {took_b:.1f}) zombie_run_s={zombie_wall:.0f} wall_s={wall:.0f}")
    print(detail, flush=True)
    logs = f"\nforecast-a:\n{a.tail(25)}\nforecast-b:\n{b.tail(25)}\nforecast-ref:\n{ref.tail(10)}"
    assert not forecasts_missing, f"forecasts missing: {sorted(forecasts_missing)[:10]} ({detail}){logs}"
    assert not scores_missing, f"scores missing: {sorted(scores_missing)[:10]} ({detail}){logs}"
    assert fc_bad + sc_bad == 0, f"repeats that differ: {fc_examples + sc_examples} ({detail})"
    assert not ref_missing, f"the reference run missed {sorted(ref_missing)[:10]} ({detail}){logs}"
    assert calibration_bad == 0, f"saved calibration differs from the reference's: {calibration_detail} ({detail})"
    assert not scores_vs_ref, (f"scores differ from the reference's: {scores_vs_ref[:5]}, e.g. "
                               f"{scores.get(scores_vs_ref[0])} vs {ref_scores.get(scores_vs_ref[0])} ({detail})")
    assert not forecasts_vs_ref, f"forecasts differ from the reference's: {forecasts_vs_ref[:5]} ({detail})"
    assert total_fenced > 0, (
        f"no write was fenced ({FENCED} summed over both processes is 0, per process {fenced}): the zombies' "
        f"late saves were not stopped by a fence, or the counter does not exist ({detail}){logs}")
    assert health == {"forecast-a": 200, "forecast-b": 200}, f"/healthz {health}{logs}"
    assert codes == {"forecast-a": 0, "forecast-b": 0, "forecast-ref": 0}, f"exit codes {codes}{logs}"


def _delete_topics(settings: Settings) -> None:
    """Delete the reference run's own forecasts and scores topics (the fixture deletes the others)."""
    from pipeline.kafka.clients import make_admin

    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        doomed = [t for t in (settings.topics.forecasts, settings.topics.scores) if t in existing]
        if doomed:
            admin.delete_topics(doomed)
    except Exception as e:  # noqa: BLE001 - cleanup must not fail the test
        logging.getLogger(__name__).warning("could not delete the reference run's topics: %s", e)
    finally:
        admin.close()
