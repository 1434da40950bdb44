"""The ``rollcast`` command: one table maps sub-command names to job modules.

Each job module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(settings, args) -> int``. The CLI builds the settings once (``--config``
plus ``ROLLCAST_*`` variables), turns the project's errors into one clear
message and a non-zero exit, and never prints a traceback for bad input.
Job modules import their heavy dependencies (torch, mlflow) inside ``run``
so that ``rollcast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pipeline.config import load_settings, resolve_endpoints
from pipeline.errors import ConfigError, RollcastError
from pipeline.logs import setup_logging

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


def main(argv: Sequence[str] | None = None) -> int:
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
        return 2
    except RollcastError as e:
        logging.getLogger("rollcast").debug("error", exc_info=True)
        print(f"rollcast {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
