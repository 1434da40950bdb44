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
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.kafka.readers import open_at_beginning, read_to_end

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


def read_latest(settings: Settings, series: list[str], idle_ms: int = 1500) -> tuple[dict[str, dict], Any]:
    """Scan the series' partitions to the current end; return the newest forecast per series and
    the consumer (positioned at the end, for --follow)."""
    topic = settings.topics.forecasts
    consumer = open_at_beginning(settings, topic, series)
    if consumer is None:
        from pipeline.errors import RollcastError

        raise RollcastError(f"topic {topic} does not exist on {settings.kafka.bootstrap_servers}")
    wanted = set(series)
    latest: dict[str, dict] = {}
    read_to_end(consumer, idle_ms, lambda value: _keep_newest(latest, value, wanted))
    return latest, consumer


def _keep_newest(latest: dict[str, dict], value: bytes, wanted: set[str]) -> dict | None:
    try:
        msg = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    s = msg.get("series")
    if s not in wanted:
        return None
    old = latest.get(s)
    if old is None or msg["last_window_end"] >= old["last_window_end"]:
        latest[s] = msg
        return msg
    return None


def iso_utc(ms: int) -> str:
    """Epoch ms as `YYYY-MM-DD HH:MM:SS` in UTC."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_table(latest: dict[str, dict], series: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for s in series:
        msg = latest.get(s)
        if msg is None:
            console.print(f"[yellow]{s}: no forecast yet[/yellow]")
            continue
        qs = list(msg["points"][0]["quantiles"]) if msg["points"] else []
        table = Table(
            title=f"{s} — model {msg['model']['name']} v{msg['model']['version']}, "
            f"after window ending {iso_utc(msg['last_window_end'])} UTC"
        )
        table.add_column("window start (UTC)")
        table.add_column("forecast", justify="right")
        for q in qs:
            table.add_column(f"q{q}", justify="right")
        for p in msg["points"]:
            table.add_row(iso_utc(p["ts"]), f"{p['mean']:.4g}", *(f"{p['quantiles'][q]:.4g}" for q in qs))
        console.print(table)


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
                        msg = _keep_newest(latest, rec.value, wanted)
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
