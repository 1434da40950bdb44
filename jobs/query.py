"""Print the latest forecast of each series from the forecasts topic.

Reads only the partitions the series' keys hash to (Kafka's murmur2
partitioner), from the beginning, and prints the newest forecast of each
series (by last_window_end) as a table, or as JSON with --json. --follow
keeps printing new forecasts as they arrive, until Ctrl-C. --plot FILE writes
a PNG of the recent actuals from the history store with the forecast and its
outer quantile interval. Exits 1 when none of the series has a forecast yet.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.config import Settings
from pipeline.latest_forecasts import keep_newest, print_table, read_latest

HELP = "print the latest forecast of series from the forecasts topic"

log = logging.getLogger("rollcast.query")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("series", nargs="+", help="series ids")
    parser.add_argument("--json", action="store_true", help="print the forecast messages as JSON lines")
    parser.add_argument("--follow", action="store_true", help="keep printing new forecasts until Ctrl-C")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="write recent actuals and the forecast to a PNG (PNG-<series>.png for several series)")
    parser.add_argument("--history", type=int, default=96, help="windows of actuals in the plot (default 96)")
    parser.add_argument("--idle-ms", type=int, default=1500,
                        help="stop reading when no record arrived for this long (default 1500)")


def plot(settings: Settings, msg: dict, path: Path, history: int) -> None:
    """PNG of the last ``history`` actual windows from the history store, the forecast and its interval."""
    from models.plots import plot_forecast_message
    from pipeline.store import HistoryStore

    start = msg["last_window_end"] - history * msg["step_ms"]
    actual = HistoryStore(settings).read(series=[msg["series"]], start_ms=start)
    plot_forecast_message(msg, actual, settings.window.target, path)


def run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.kafka.clients import poll_promptly

    latest, consumer = read_latest(settings, args.series, args.idle_ms)
    try:
        if args.json:
            for s in args.series:
                if s in latest:
                    print(json.dumps(latest[s]), flush=True)
        else:
            print_table(latest, args.series)
        if args.plot:
            if not latest:
                print("no forecast to plot")
            else:
                for s in args.series:
                    if s in latest:
                        path = args.plot if len(args.series) == 1 else args.plot.with_name(
                            f"{args.plot.stem}-{s}{args.plot.suffix}")
                        plot(settings, latest[s], path, args.history)
                        print(f"wrote {path}")
        if args.follow:
            wanted = set(args.series)
            while True:
                for records in poll_promptly(consumer, 500).values():
                    for rec in records:
                        msg = keep_newest(latest, rec.value, wanted)
                        if msg is None:
                            continue
                        if args.json:
                            print(json.dumps(msg), flush=True)
                        else:
                            print_table({msg["series"]: msg}, [msg["series"]])
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0 if latest else 1
