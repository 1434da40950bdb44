"""The newest forecast of each series, read from the forecasts topic, and its table: what `rollcast
query` prints and `rollcast demo` shows once its live replay has been forecast.

>>> iso_utc(1_400_000_000_000)
'2014-05-13 16:53:20'
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import polars as pl

from pipeline.config import Settings
from pipeline.errors import RollcastError
from pipeline.kafka.readers import open_at_beginning, read_to_end


def read_latest(settings: Settings, series: list[str], idle_ms: int = 1500) -> tuple[dict[str, dict], Any]:
    """Scan the series' partitions to the current end; return the newest forecast per series and
    the consumer (positioned at the end, for --follow)."""
    topic = settings.topics.forecasts
    consumer = open_at_beginning(settings, topic, series)
    if consumer is None:
        raise RollcastError(f"topic {topic} does not exist on {settings.kafka.bootstrap_servers}")
    wanted = set(series)
    latest: dict[str, dict] = {}
    read_to_end(consumer, idle_ms, lambda value: keep_newest(latest, value, wanted))
    return latest, consumer


def keep_newest(latest: dict[str, dict], value: bytes, wanted: set[str]) -> dict | None:
    """Keep the forecast in ``value`` in ``latest`` if it is of a wanted series and no older than the one
    kept; return it then, else None."""
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


def wait_for_forecasts(settings: Settings, series: list[str], live: pl.DataFrame, timeout_s: float) -> dict[str, dict]:
    """The newest forecast of each of ``series`` once every one of them that is in the ``live``
    observations (series, ts) has a forecast made after its first live window closed; raise
    :class:`RollcastError` after ``timeout_s``."""
    length = settings.window.length_ms
    # the last live window of a series closes only when it idles out; the one before closes at once
    firsts = live.group_by("series").agg(pl.col("ts").min())
    want = {s: (t // length + 1) * length for s, t in firsts.iter_rows() if s in series}
    deadline = time.monotonic() + timeout_s
    while True:
        latest, consumer = read_latest(settings, series, idle_ms=500)
        consumer.close()
        if all(s in latest and latest[s]["last_window_end"] >= end for s, end in want.items()):
            return latest
        if time.monotonic() > deadline:
            raise RollcastError(f"no forecasts for {sorted(want)} within {timeout_s:g}s; see "
                                f"{settings.data_dir / 'logs' / 'forecast.log'} and train's output above")
        time.sleep(2.0)
