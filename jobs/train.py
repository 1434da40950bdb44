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

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.runtime import Shutdown

HELP = "retrain the models on a schedule, version them in MLflow, move the champion alias"

log = logging.getLogger("rollcast.train")


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
    from models.train.session import run_once, train_session
    from pipeline.observability import Health, serve_http

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
        run_once(settings, stop, progress=progress)  # exits 0 also when nothing was promoted
        return 0

    health = Health("train", poll_interval_s=max(120.0, 10 * args.poll_s))
    if settings.observability.metrics_port is not None:
        serve_http(settings.observability.metrics_port, health)
    train_session(settings, stop, health, progress=progress, poll_s=args.poll_s)
    log.info("train job stopped")
    return 0
