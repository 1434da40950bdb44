"""Retrain the configured models on a schedule, version each in MLflow, and move `champion`.

One cycle (:func:`models.cycle.run_cycle`) reads the last train.span_windows
windows per series from the history store, trains every type in model.types,
scores each on the same holdout as the current champion and seasonal naive,
logs one MLflow run and one registered version per model, and moves the alias
mlflow.champion_alias to the best new version only if its holdout MAE beats
seasonal naive and the champion's by the margin train.min_improvement
(:func:`models.selection.decide`); a version with a non-finite loss or metric
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

from models.schedule import Schedule
from pipeline.config import Settings
from pipeline.errors import ConfigError, MlflowUnavailable, NotEnoughData, StoreUnavailable
from pipeline.runtime import Shutdown

if TYPE_CHECKING:
    from models.cycle import CycleResult

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
    from models import tracking
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
        from models.cycle import run_cycle

        result = run_cycle(settings, progress=progress, stop=stop)
        if result is not None:
            _report(result)
        return 0

    health = Health("train", poll_interval_s=max(120.0, 10 * args.poll_s))
    if settings.observability.metrics_port is not None:
        serve_http(settings.observability.metrics_port, health)
    store = HistoryStore(settings)
    t = settings.train
    schedule = Schedule(t.every_minutes * 60 if t.every_minutes else None, t.after_windows, store.counter())
    reason = resume(settings, schedule, store)
    while not stop.is_set():
        if reason is not None:
            log.info("training cycle: %s", reason)
            schedule.mark()
            _guarded_cycle(settings, progress, stop, health)
        health.polled()
        if stop.wait(args.poll_s):
            break
        reason = schedule.due()
    log.info("train job stopped")
    return 0


def resume(settings: Settings, schedule: Schedule, store: Any) -> str | None:
    """Continue the schedule from the last cycle recorded in MLflow (the newest registered version: when
    it was created, and the windows newer than its data); return why a cycle is due now, or None.

    A restarted job (a deploy, a crash, ``rollcast up`` after ``train --once``) would otherwise count
    "every T minutes" from its own start and retrain at once, however recent the last model. With no
    version yet, or MLflow unreachable, the first cycle runs at start.
    """
    from models import tracking

    try:
        last = tracking.latest_version(settings)
    except MlflowUnavailable as e:
        log.warning("cannot look up the last cycle (%s); training now", e)
        return "start-up (the last cycle is unknown)"
    if last is None:
        return "start-up (no version yet)"
    ago_s = max(0.0, time.time() - last.creation_timestamp / 1000)  # a server clock ahead: as if just now
    data_end = str((last.tags or {}).get(tracking.DATA_END_MS_TAG, ""))
    new_windows = None  # counted only for an after_windows schedule: a filtered read of every file
    if schedule.after_windows is not None and data_end.isdigit():
        try:
            new_windows = store.count(after_ms=int(data_end))
        except StoreUnavailable as e:
            log.warning("cannot count the windows since the last cycle (%s); counting from now", e)
    schedule.resume(ago_s, new_windows)
    reason = schedule.due()
    log.info("last cycle: version %s of %s, %.1f minutes ago; %s", last.version, settings.mlflow.registered_model,
             ago_s / 60, f"training now: {reason}" if reason else f"next cycle {schedule.next()}")
    return reason


def _guarded_cycle(settings: Settings, progress: bool, stop: Shutdown, health: Any) -> None:
    """One cycle of the long-running job: data and MLflow outages are logged, not fatal."""
    from models.cycle import run_cycle

    try:
        result = run_cycle(settings, progress=progress, stop=stop)
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
    _report(result)


def _report(result: CycleResult) -> None:
    from models.cycle import iso

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
