"""Run the whole pipeline on a real dataset: replay -> ingest -> train -> forecast -> query.

Starts what `rollcast up` starts (broker, MLflow server, and the ingest, train
and forecast jobs), then:

1. replays the first part of a bundled dataset (by default half-hourly
   electricity demand and air temperature of Victoria, Australia, in 2014)
   into the observations topic, and waits until ingest has written its
   windows to the history store;
2. trains the configured models once (`rollcast train --once`), which logs
   them to MLflow, registers versions and promotes a champion if one beats
   seasonal naive;
3. replays the rest of the dataset, so the forecast job (serving the champion)
   publishes a rolling forecast for every window that closes;
4. prints `rollcast query` output for the series;
5. prints `rollcast scores` output (live accuracy per series and model version of
   the forecasts whose windows have closed) and where to look in the MLflow UI.

The stack then stays up for you to look around until Ctrl-C; with
--exit-after-replay everything is stopped once the forecasts are out.
"""

from __future__ import annotations

import argparse
import subprocess
import time

from jobs.stack import Stack, available_jobs, print_endpoints, serve, start_services
from pipeline.config import Settings
from pipeline.datasets import ColumnMap, load_observations, resolve_dataset
from pipeline.errors import RollcastError
from pipeline.latest_forecasts import print_table, wait_for_forecasts
from pipeline.replay import parse_speed, replay, split_at, wait_for_windows
from pipeline.runtime import Shutdown, Stopped

HELP = "run the whole pipeline on a real dataset: replay, ingest, train, forecast, query, scores"
RESOLVE_ENDPOINTS = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="victoria_electricity_halfhourly.csv", help="bundled dataset name or a file (series, ts, value)"
    )
    parser.add_argument("--speed", default="max", help="replay speed: multiple of real time or 'max'")
    parser.add_argument("--limit", type=int, help="replay only the first N observations")
    parser.add_argument("--live-fraction", type=float, default=0.05,
                        help="share of the dataset replayed after the first model is trained (default 0.05)")
    parser.add_argument("--timeout-s", type=float, default=900, help="give up on a step after this long")
    parser.add_argument("--exit-after-replay", action="store_true", help="stop everything and exit once the "
                        "replay has gone through the pipeline and forecasts are out")


def run(settings: Settings, args: argparse.Namespace) -> int:
    shutdown = Shutdown("demo", raise_in_main=True)  # interrupts the waits for the children to start
    st = None
    try:
        st = start_services(settings, args.config)
        # the scheduled train job starts after the demo's first training, so the two never race
        for name in available_jobs(settings):
            if name != "train":
                st.start_job(name)
        print_endpoints(st)
        run_pipeline(st, args)
        if args.exit_after_replay:
            return 0
        print(f"\nThe stack stays up; open {st.tracking_uri} for MLflow. Press Ctrl-C to stop.", flush=True)
        serve(st)
    except (Stopped, KeyboardInterrupt):
        print("stopping ...", flush=True)
    finally:
        shutdown.ignore_further_signals()
        if st is not None:
            st.stop()
    return 0


def run_pipeline(st: Stack, args: argparse.Namespace) -> None:
    settings = st.settings.replace(**{"kafka.bootstrap_servers": st.bootstrap_servers,
                                      "mlflow.tracking_uri": st.tracking_uri})
    df = load_observations(resolve_dataset(args.dataset), ColumnMap())
    if args.limit is not None:
        df = df.head(args.limit)
    series = df["series"].unique(maintain_order=True).to_list()
    history, live = split_at(df, 1 - args.live_fraction)
    speed = parse_speed(args.speed)

    step("1/5", f"replaying {history.height} observations of {len(series)} series from {args.dataset}")
    replay(settings, history, speed=speed)
    if "ingest" in st.jobs:
        wait_for_windows(settings, history, args.timeout_s)

    if "train" in available_jobs(settings):
        step("2/5", "training the first model (rollcast train --once)")
        train = subprocess.run(st.job_argv("train", "--once"), env=st.job_env("train"), timeout=args.timeout_s)
        if train.returncode != 0:
            raise RollcastError(f"`rollcast train --once` failed with status {train.returncode}")
        st.start_job("train")  # from now on, retraining follows train.every_minutes / after_windows

    step("3/5", f"replaying the last {live.height} observations: forecasts follow every closed window")
    replay(settings, live, speed=speed)

    if "forecast" in st.jobs:
        step("4/5", f"latest forecasts (rollcast query {' '.join(series[:3])})")
        print_table(wait_for_forecasts(settings, series[:3], live, args.timeout_s), series[:3])
        step("5/5", f"live accuracy of the served forecasts (rollcast scores --series {' '.join(series[:3])})")
        show_scores(settings, series[:3])
    from models.tracking.client import experiment_url

    print(f"\nMLflow UI: {st.tracking_uri}")
    print(f"  experiment '{settings.mlflow.experiment}': one run per model and cycle, with params, per-epoch")
    print("  losses, holdout metrics against the champion and seasonal naive, and forecast/loss plots;")
    print(f"  open on its runs at {experiment_url(settings)}")
    print(f"  Models > '{settings.mlflow.registered_model}': every version, the serving one tagged "
          f"@{settings.mlflow.champion_alias}.")


def step(n: str, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


SCORES_WAIT_S = 3.0  # the longest the demo waits for the first scores


def show_scores(settings: Settings, series: list[str]) -> None:
    """Print the live accuracy of ``series`` from the scores topic: the forecast job publishes a score once all of a
    forecast's windows have closed (and saves its scoring state every scoring.checkpoint_s), so the
    first may come a few seconds after the live replay; waits at most SCORES_WAIT_S for them."""
    from models.scoring.report import Scores, format_tables, summarise
    from pipeline.kafka.readers import open_at_beginning, read_to_end

    deadline = time.monotonic() + SCORES_WAIT_S
    while True:
        scores = Scores(set(series))
        consumer = open_at_beginning(settings, settings.topics.scores, series)
        if consumer is not None:
            try:
                read_to_end(consumer, 500, scores.add_value)
            finally:
                consumer.close()
        if chosen := scores.selected(None):
            print(format_tables(summarise(chosen)), flush=True)
            return
        if time.monotonic() > deadline:
            print(f"no scores on {settings.topics.scores} yet (scoring.enabled = "
                  f"{str(settings.scoring.enabled).lower()}); `rollcast scores --follow` waits for them", flush=True)
            return
        time.sleep(1.0)
