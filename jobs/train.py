"""Retrain the configured models on a schedule, version each in MLflow, and move `champion`.

One cycle (:func:`models.train.cycle.run_cycle`) reads the last train.span_windows
windows per series from the history store, trains every type in model.types,
scores each on the same holdout as the current champion and seasonal naive,
logs one MLflow run and one registered version per model, and moves the alias
mlflow.champion_alias to the best new version only if its holdout MAE beats
seasonal naive and the champion's by the margin train.min_improvement
(:func:`models.train.selection.decide`); a version with a non-finite loss or metric
is tagged validation_status=failed and never promoted.

Cycles run every train.every_minutes, after train.after_windows new windows
reached the store, or on whichever comes first when both are set, counted
from the last cycle recorded in MLflow (the newest registered version and the
data it was trained on), so a restarted job does not retrain at once; with no
version yet the first cycle runs at start. If MLflow is unreachable a cycle is
retried train.max_retries times with exponential backoff (trained models are
kept, not retrained), and a failed cycle never touches the serving champion.
A cycle trains on train.samples_per_epoch samples drawn per epoch from the
span's series matrix; it fine-tunes the champion (a warm cycle) when its type
and config are unchanged, except every train.full_every-th cycle, which
retrains from scratch. With train.strategy = "ddp" every process trains and
only rank 0 scores, logs to MLflow and registers (README: "Training at scale").
Besides its schedules, the job starts a cycle on drift (:mod:`models.scoring.drift`): it reads the scores
topic (group groups.scores) and, once the champion version has train.drift_min_points scored points
in the last train.drift_windows windows, starts a cycle when their live relative MAE exceeds the
champion's holdout relative MAE times train.drift_factor or their live coverage falls below
train.drift_coverage_floor, unless a cycle ended less than train.drift_cooldown_minutes ago. Every
cycle's runs and versions carry the tag rollcast.trigger (schedule, windows, drift, or manual for
--once), rollcast.trigger_reason, and for drift the figures (rollcast.drift.*). Every
train.live_log_s the live metrics (live_mae, live_relative_mae, live_coverage, live_model_coverage,
live_points) of every version with new scores go to its training run.
--once runs one cycle and exits (0 also when nothing was promoted).
SIGTERM or Ctrl-C stops training at the end of the current batch, abandons
the cycle, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from models import tracking
from models.scoring.drift import wait_either
from models.train.schedule import Schedule
from pipeline.config import Settings
from pipeline.errors import ConfigError, MlflowUnavailable, NotEnoughData, StoreUnavailable
from pipeline.runtime import Shutdown

if TYPE_CHECKING:
    from models.scoring.drift import Drift, LiveMonitor
    from models.train.cycle import CycleResult

HELP = "retrain the models on a schedule, version them in MLflow, move the champion alias"

log = logging.getLogger("rollcast.train")

CYCLES = Counter("rollcast_train_cycles_total", "Training cycles by outcome", ["outcome"])
LAST_SUCCESS = Gauge("rollcast_train_last_success_timestamp_seconds", "End of the last successful cycle")
CHAMPION_VERSION = Gauge("rollcast_train_champion_version", "Registered version carrying the champion alias")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="run one cycle now and exit")
    parser.add_argument("--every-minutes", type=float, help="override train.every_minutes")
    parser.add_argument("--after-windows", type=int, help="override train.after_windows")
    parser.add_argument(
        "--poll-s", type=float, default=10.0, help="how often to check the schedule and the store (default: 10)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no training progress bar")


def run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.observability import Health, serve_http
    from pipeline.store import HistoryStore

    overrides = {k: v for k, v in (("train.every_minutes", args.every_minutes),
                                   ("train.after_windows", args.after_windows)) if v is not None}
    if overrides:
        settings = settings.replace(**overrides)
    if settings.train.every_minutes is None and settings.train.after_windows is None and not args.once:
        raise ConfigError(["train: set train.every_minutes or train.after_windows (or run with --once)"])
    tracking.configure(settings)
    stop = Shutdown("train", settings.observability.shutdown_timeout_s)
    progress = sys.stderr.isatty() and not args.no_progress

    if args.once:
        from models.train.cycle import run_cycle

        result = run_cycle(settings, progress=progress, stop=stop,
                           trigger=trigger_tags(tracking.TRIGGER_MANUAL, "train --once"))
        if result is not None:
            _report(result, settings)
        return 0

    health = Health("train", poll_interval_s=max(120.0, 10 * args.poll_s))
    if settings.observability.metrics_port is not None:
        serve_http(settings.observability.metrics_port, health)
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
                _guarded_cycle(settings, progress, stop, health, due)
                if monitor is not None:
                    monitor.cycle_done()
            health.polled()
            if wait_either(stop, monitor.wake if monitor is not None else None, args.poll_s):
                break
            due = next_trigger(schedule, monitor)
    finally:
        if monitor is not None:
            monitor.stop()
    log.info("train job stopped")
    return 0


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


def _guarded_cycle(settings: Settings, progress: bool, stop: Shutdown, health: Any,
                   trigger: dict[str, str] | None = None) -> None:
    """One cycle of the long-running job: data and MLflow outages are logged, not fatal."""
    from models.train.cycle import run_cycle

    try:
        result = run_cycle(settings, progress=progress, stop=stop, trigger=trigger)
    except NotEnoughData as e:
        CYCLES.labels("not_enough_data").inc()
        log.warning("no cycle: %s", e)
        return
    except (MlflowUnavailable, StoreUnavailable) as e:
        CYCLES.labels("mlflow_unavailable" if isinstance(e, MlflowUnavailable) else "store_unavailable").inc()
        health.facts["last_error"] = str(e)
        log.error("cycle failed: %s", e)
        return
    if result is None:
        CYCLES.labels("aborted").inc()
        return
    CYCLES.labels("promoted" if result.promoted else "not_promoted").inc()
    LAST_SUCCESS.set(time.time())
    health.facts.update(last_cycle=result.cycle_id, champion=result.promoted or result.champion_before)
    champ = result.promoted or result.champion_before
    if champ is not None:
        CHAMPION_VERSION.set(int(champ))
    _report(result, settings)


def _report(result: CycleResult, settings: Settings) -> None:
    from models.tracking.runs import iso

    s = result.span
    print(f"cycle {result.cycle_id}: {s.series} series, windows {iso(s.start_ms)} .. {iso(s.end_ms)}", flush=True)
    for c in result.candidates:
        kind = f"warm from v{c.parent_version}" if c.parent_version else c.cycle_kind
        print(f"  {c.model_type:<16} version {c.version:<4} ({kind}) holdout MAE {c.mae:.5g}  "
              f"(seasonal naive {c.metrics.get('seasonal_naive_holdout_mae', float('nan')):.5g}, "
              f"champion {c.metrics.get('champion_holdout_mae', float('nan')):.5g})  {c.decision}", flush=True)
    if result.promoted:
        print(f"champion -> version {result.promoted}", flush=True)
    else:
        print(f"champion unchanged ({result.champion_before or 'none yet'})", flush=True)
    if (settings.mlflow.tracking_uri or "").startswith(("http://", "https://")):
        print(f"MLflow runs: {tracking.experiment_url(settings)}", flush=True)
