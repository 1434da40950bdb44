"""Run the embedded stack and replay a real dataset through the whole pipeline.

Starts what `rollcast up` starts (broker, MLflow server, pipeline jobs), then
replays a bundled dataset (by default hourly air temperatures of San Francisco
and Seattle in 2010, NOAA, public domain) into the observations topic, and
prints where to look. The stack stays up for you to look around until Ctrl-C,
or, with --exit-after-replay, everything is stopped once the replay has gone
through the pipeline.
"""

from __future__ import annotations

import argparse
import logging
import signal

from jobs import replay as replay_job
from jobs.up import Stop, available_jobs, print_endpoints, serve, sigterm_stops, start_services
from pipeline.config import Settings

HELP = "run the embedded stack and replay a real dataset through the pipeline"
RESOLVE_ENDPOINTS = False

log = logging.getLogger("rollcast.demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="temperature_hourly.csv", help="bundled dataset name or a file (series, ts, value)"
    )
    parser.add_argument("--speed", default="max", help="replay speed: multiple of real time or 'max'")
    parser.add_argument("--limit", type=int, help="replay only the first N observations")
    parser.add_argument(
        "--exit-after-replay", action="store_true",
        help="stop everything and exit 0 once the replay has gone through the pipeline",
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    with sigterm_stops():
        st = None
        try:
            st = start_services(settings, args.config)
            for name in available_jobs(settings):
                st.start_job(name)
            print_endpoints(st)
            resolved = settings.replace(
                **{"kafka.bootstrap_servers": st.bootstrap_servers, "mlflow.tracking_uri": st.tracking_uri}
            )
            df = replay_job.load_observations(replay_job.resolve_dataset(args.dataset), replay_job.ColumnMap())
            if args.limit is not None:
                df = df.head(args.limit)
            sent = replay_job.replay(resolved, df, speed=replay_job.parse_speed(args.speed))
            print(f"replayed {sent} observations of {df['series'].n_unique()} series from {args.dataset} "
                  f"into {settings.topics.observations}", flush=True)
            if args.exit_after_replay:
                return 0
            print(f"The stack stays up: open {st.tracking_uri} for MLflow. Press Ctrl-C to stop.", flush=True)
            serve(st)
        except (Stop, KeyboardInterrupt):
            print("stopping ...", flush=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if st is not None:
                st.stop()
    return 0
