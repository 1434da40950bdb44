"""Run the embedded stack on this machine until Ctrl-C or SIGTERM.

Starts, as managed child processes, the tansu Kafka-protocol broker (in-memory)
and an MLflow server (SQLite store, served artifacts under the data
directory), waits until both are healthy, creates the topics, then starts the
pipeline jobs (ingest, train, forecast) against them and restarts a job that
dies. If kafka.bootstrap_servers or mlflow.tracking_uri are configured, those
are used instead of starting a broker or MLflow server. On Ctrl-C or SIGTERM
everything is stopped, jobs first, and no child process is left behind.
"""

from __future__ import annotations

import argparse

from jobs.stack import available_jobs, print_endpoints, serve, start_services
from pipeline.config import Settings
from pipeline.errors import RollcastError
from pipeline.runtime import Shutdown, Stopped

HELP = "run the embedded stack: broker, MLflow server and the pipeline jobs"
RESOLVE_ENDPOINTS = False  # `up` decides itself whether to start a broker and MLflow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-jobs", action="store_true", help="start only the broker and MLflow, not the pipeline jobs"
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    shutdown = Shutdown("up", raise_in_main=True)  # interrupts the waits for the children to start
    st = None
    try:
        st = start_services(settings, args.config)
        if not args.no_jobs:
            for name in available_jobs(settings):
                st.start_job(name)
        print_endpoints(st)
        serve(st)
    except (Stopped, KeyboardInterrupt):
        print("stopping ...", flush=True)
    except RollcastError:
        raise
    finally:
        shutdown.ignore_further_signals()
        if st is not None:
            st.stop()
    return 0
