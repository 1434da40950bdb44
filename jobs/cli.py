"""The ``rollcast`` command: one table maps sub-command names to job modules.

Each job module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(settings, args) -> int``. The CLI builds the settings once (``--config``
plus ``ROLLCAST_*`` variables), turns the project's errors into one clear
message and a non-zero exit, and never prints a traceback for bad input.
Exit codes: 0 done, 1 an error, 2 invalid settings, 4 a record batch that
failed its checks stopped the job (``kafka.on_corrupt_batch = "stop"``),
130 interrupted; each error class carries its own (``RollcastError.exit_code``).
Job modules import their heavy dependencies (torch, mlflow) inside ``run``
so that ``rollcast --help`` stays fast.

A ``rollcast`` process starts with the garbage collector off (see
:func:`collector_off_during_start_up`); jobs turn it back on once started.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import sys
import threading
from collections.abc import Sequence

from pipeline.config import load_settings, resolve_endpoints
from pipeline.errors import ConfigError, RollcastError
from pipeline.logs import setup_logging

# the longest a process runs with the garbage collector off (see collector_off_during_start_up)
START_UP_WITHOUT_GC_S = 30.0

# name -> module; the order is the order of `rollcast --help`.
COMMANDS: dict[str, str] = {
    "up": "jobs.up",
    "demo": "jobs.demo",
    "ingest": "jobs.ingest",
    "train": "jobs.train",
    "forecast": "jobs.forecast",
    "replay": "jobs.replay",
    "backtest": "jobs.backtest",
    "query": "jobs.query",
    "scores": "jobs.scores",
    "topics": "jobs.topics",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollcast",
        description="Streaming time-series forecasting: Kafka -> Arrow windows -> Lightning models "
        "-> rolling forecasts, every model versioned in MLflow.",
        epilog="Settings come from --config (TOML) and ROLLCAST_<SECTION>__<KEY> variables; "
        "see README.md.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        p.set_defaults(_module=module)
        module.add_arguments(p)
    return parser


def collector_off_during_start_up(at_most_s: float = START_UP_WITHOUT_GC_S) -> None:
    """Turn the garbage collector off until a job turns it back on (``gc.enable()``), at most ``at_most_s``.

    Start-up imports (torch, Lightning, polars, pyarrow, MLflow, the Kafka clients) create about a million
    objects that live as long as the process, and the collector walked them again and again while they
    were being created, which made the forecast job's imports markedly slower (figures in BENCHMARKS.md).
    Reference counting still frees everything that is not in a cycle. The forecast job turns it back on
    when it freezes its start-up heap, ingest before its first poll; a timer does for every other command.
    """
    gc.disable()
    timer = threading.Timer(at_most_s, gc.enable)
    timer.daemon = True
    timer.start()


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # a process of its own (the console script, python -m jobs.cli), not a caller's call
        collector_off_during_start_up()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        if getattr(args._module, "RESOLVE_ENDPOINTS", True):
            settings = resolve_endpoints(settings)
        setup_logging(settings.observability)
        return int(args._module.run(settings, args) or 0)
    except ConfigError as e:
        print(f"rollcast: {e}", file=sys.stderr)
        return e.exit_code
    except RollcastError as e:
        logging.getLogger("rollcast").debug("error", exc_info=True)
        print(f"rollcast {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
