"""The train job's session: go on from the last cycle recorded in MLflow, wait for a schedule or drift,
run a cycle (:func:`models.train.cycle.run_cycle`), count and print what it did.

``rollcast train`` runs :func:`train_session` until it is stopped, or :func:`run_once` for ``--once``.
What starts a cycle is written on its runs and versions (:func:`trigger_tags`): a schedule
(:class:`models.train.schedule.Schedule`: every ``train.every_minutes``, after ``train.after_windows``
new windows) or drift in the champion's live accuracy (:class:`models.scoring.drift.LiveMonitor`, which
also logs live metrics to MLflow). A data or MLflow outage fails one cycle, not the session.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from models import tracking
from models.scoring.drift import wait_either
from models.tracking.runs import iso
from models.tracking.tags import CHAMPION_HOLDOUT_MAE, SEASONAL_NAIVE_HOLDOUT_MAE
from models.train import telemetry as metrics
from models.train.cycle import CycleResult, run_cycle
from models.train.schedule import Schedule
from pipeline.config import Settings
from pipeline.errors import MlflowUnavailable, NotEnoughData, StoreUnavailable

if TYPE_CHECKING:
    from models.scoring.drift import Drift, LiveMonitor

log = logging.getLogger("rollcast.train")


def run_once(settings: Settings, stop: threading.Event, *, progress: bool = False) -> CycleResult | None:
    """One cycle now (``rollcast train --once``, trigger ``manual``), printed; None if stopped."""
    result = run_cycle(settings, progress=progress, stop=stop,
                       trigger=trigger_tags(tracking.TRIGGER_MANUAL, "train --once"))
    if result is not None:
        report(result, settings)
    return result


def train_session(settings: Settings, stop: threading.Event, health: Any, *, progress: bool = False,
                  poll_s: float = 10.0) -> None:
    """Run cycles as they come due until ``stop`` is set; check the schedule every ``poll_s`` seconds
    (at once when the live monitor sees drift)."""
    from pipeline.store import HistoryStore

    store = HistoryStore(settings)
    t = settings.train
    schedule = Schedule(t.every_minutes * 60 if t.every_minutes else None, t.after_windows, store.counter())
    due = resume(settings, schedule, store)
    monitor = start_monitor(settings, schedule.last_time)
    try:
        while not stop.is_set():
            if due is not None:
                log.info("training cycle: %s", due[tracking.TRIGGER_REASON_TAG])
                schedule.mark()
                guarded_cycle(settings, progress, stop, health, due)
                if monitor is not None:
                    monitor.cycle_done()
            health.polled()
            if wait_either(stop, monitor.wake if monitor is not None else None, poll_s):
                break
            due = next_trigger(schedule, monitor)
    finally:
        if monitor is not None:
            monitor.stop()


def trigger_tags(kind: str, reason: str, drift: Drift | None = None) -> dict[str, str]:
    """The MLflow tags of a cycle's runs and versions that say what started it."""
    return {tracking.TRIGGER_TAG: kind, tracking.TRIGGER_REASON_TAG: reason, **(drift.tags() if drift else {})}


def next_trigger(schedule: Schedule, monitor: LiveMonitor | None) -> dict[str, str] | None:
    """The tags of the cycle due now (a schedule first, then drift), or None."""
    found = schedule.trigger()
    if found is not None:
        return trigger_tags(*found)
    drift = monitor.drift() if monitor is not None else None
    if drift is not None:
        return trigger_tags(tracking.TRIGGER_DRIFT, drift.reason(), drift)
    return None


def start_monitor(settings: Settings, last_cycle: float) -> LiveMonitor | None:
    """The live-accuracy monitor of the scores topic (drift trigger, live MLflow metrics), or None when
    no broker is configured. Under multi-process DDP only global rank 0 reads the scores (and logs live
    metrics); the drift trigger is off there, since the other ranks could not join a cycle only rank 0
    decided on."""
    from models.scoring.drift import LiveMonitor, process_rank

    if not settings.kafka.bootstrap_servers:
        log.info("no kafka.bootstrap_servers: no live accuracy, no drift trigger (schedules only)")
        return None
    rank, world = process_rank()
    if rank != 0:
        return None
    if world > 1:
        log.warning("%d training processes: the drift trigger is off (live metrics are still logged)", world)
    return LiveMonitor(settings, last_cycle, judge_drift=world == 1).start()


def resume(settings: Settings, schedule: Schedule, store: Any) -> dict[str, str] | None:
    """Continue the schedule from the last cycle recorded in MLflow (the newest registered version: when
    it was created, and the windows newer than its data); return the trigger tags of the cycle due now
    (:func:`trigger_tags`), or None.

    A restarted job (a deploy, a crash, ``rollcast up`` after ``train --once``) would otherwise count
    "every T minutes" from its own start and retrain at once, however recent the last model. With no
    version yet, or MLflow unreachable, the first cycle runs at start.
    """
    try:
        last = tracking.latest_version(settings)
    except MlflowUnavailable as e:
        log.warning("cannot look up the last cycle (%s); training now", e)
        return trigger_tags(tracking.TRIGGER_SCHEDULE, "start-up (the last cycle is unknown)")
    if last is None:
        return trigger_tags(tracking.TRIGGER_SCHEDULE, "start-up (no version yet)")
    ago_s = max(0.0, time.time() - last.creation_timestamp / 1000)  # a server clock ahead: as if just now
    data_end = str((last.tags or {}).get(tracking.DATA_END_MS_TAG, ""))
    new_windows = None  # counted only for an after_windows schedule: a filtered read of every file
    if schedule.after_windows is not None and data_end.isdigit():
        try:
            new_windows = store.count(after_ms=int(data_end))
        except StoreUnavailable as e:
            log.warning("cannot count the windows since the last cycle (%s); counting from now", e)
    schedule.resume(ago_s, new_windows)
    found = schedule.trigger()
    log.info("last cycle: version %s of %s, %.1f minutes ago; %s", last.version, settings.mlflow.registered_model,
             ago_s / 60, f"training now: {found[1]}" if found else f"next cycle {schedule.next()}")
    return trigger_tags(*found) if found else None


def guarded_cycle(settings: Settings, progress: bool, stop: threading.Event, health: Any,
                  trigger: dict[str, str] | None = None) -> CycleResult | None:
    """One cycle of the long-running job: data and MLflow outages are logged and counted, not fatal."""
    try:
        result = run_cycle(settings, progress=progress, stop=stop, trigger=trigger)
    except NotEnoughData as e:
        metrics.CYCLES.labels("not_enough_data").inc()
        log.warning("no cycle: %s", e)
        return None
    except (MlflowUnavailable, StoreUnavailable) as e:
        metrics.CYCLES.labels("mlflow_unavailable" if isinstance(e, MlflowUnavailable) else "store_unavailable").inc()
        health.facts["last_error"] = str(e)
        log.error("cycle failed: %s", e)
        return None
    if result is None:
        metrics.CYCLES.labels("aborted").inc()
        return None
    metrics.CYCLES.labels("promoted" if result.promoted else "not_promoted").inc()
    metrics.LAST_SUCCESS.set(time.time())
    health.facts.update(last_cycle=result.cycle_id, champion=result.promoted or result.champion_before)
    champ = result.promoted or result.champion_before
    if champ is not None:
        metrics.CHAMPION_VERSION.set(int(champ))
    report(result, settings)
    return result


def report(result: CycleResult, settings: Settings) -> None:
    """Print what a cycle did: its data, each candidate's version and holdout MAE, and the champion."""
    s = result.span
    print(f"cycle {result.cycle_id}: {s.series} series, windows {iso(s.start_ms)} .. {iso(s.end_ms)}", flush=True)
    for c in result.candidates:
        kind = f"warm from v{c.parent_version}" if c.parent_version else c.cycle_kind
        print(f"  {c.model_type:<16} version {c.version:<4} ({kind}) holdout MAE {c.mae:.5g}  "
              f"(seasonal naive {c.metrics.get(SEASONAL_NAIVE_HOLDOUT_MAE, float('nan')):.5g}, "
              f"champion {c.metrics.get(CHAMPION_HOLDOUT_MAE, float('nan')):.5g})  {c.decision}", flush=True)
    if result.promoted:
        print(f"champion -> version {result.promoted}", flush=True)
    else:
        print(f"champion unchanged ({result.champion_before or 'none yet'})", flush=True)
    if (settings.mlflow.tracking_uri or "").startswith(("http://", "https://")):
        print(f"MLflow runs: {tracking.experiment_url(settings)}", flush=True)
