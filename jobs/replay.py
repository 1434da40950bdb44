"""Produce a CSV or Parquet dataset into the observations topic.

Rows are sent in event-time order, one JSON observation per message keyed by
series id (or, with --format arrow, Arrow IPC batches of many rows, each
holding series of one partition, so a series always stays on one partition). --speed
replays at a multiple of real time (1 = as recorded, 3600 = an hour per
second) or as fast as possible (max). Columns are mapped with --series-col,
--ts-col and --value-col; a file with one series and no series column takes
--series NAME. Timestamps may be epoch milliseconds or ISO-8601 / date
strings (read as UTC). The bundled datasets are named by their file name,
e.g. `rollcast replay temperature_hourly.csv`.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.config import Settings
from pipeline.datasets import ColumnMap, load_observations, resolve_dataset
from pipeline.errors import DatasetError
from pipeline.kafka.headers import ARROW_HEADERS

HELP = "produce a CSV or Parquet dataset into the observations topic"


log = logging.getLogger("rollcast.replay")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="CSV or Parquet file, or the name of a bundled dataset")
    parser.add_argument("--series-col", default="series", help="column with the series id (default: series)")
    parser.add_argument("--ts-col", default="ts", help="column with the event time (default: ts)")
    parser.add_argument("--value-col", default="value", help="column with the value (default: value)")
    parser.add_argument("--series", help="series id for a file without a series column")
    parser.add_argument(
        "--speed", default="max", help="multiple of real time (e.g. 60) or 'max' (default: max)"
    )
    parser.add_argument("--format", choices=["json", "arrow"], default="json", help="message format")
    parser.add_argument("--batch-rows", type=int, default=10_000, help="rows per Arrow message")
    parser.add_argument("--limit", type=int, help="send only the first N rows (in event-time order)")
    parser.add_argument("--topic", help="target topic (default: topics.observations)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_speed(text: str) -> float | None:
    """None for 'max', else a positive multiple of real time."""
    if text == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        speed = -1.0
    if not speed > 0:
        raise DatasetError(f"--speed: expected a positive number or 'max', got {text!r}")
    return speed


def json_messages(df: pl.DataFrame, settings: Settings) -> list[bytes]:
    """One JSON object per row, with the configured field names."""
    f = settings.fields
    renamed = df.rename({"series": f.series, "ts": f.ts, "value": f.value})
    buf = renamed.write_ndjson()
    return [line.encode() for line in buf.splitlines()]


def arrow_message(df: pl.DataFrame, settings: Settings) -> bytes:
    f = settings.fields
    table = df.rename({"series": f.series, "ts": f.ts, "value": f.value}).to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def replay(
    settings: Settings,
    df: pl.DataFrame,
    *,
    speed: float | None = None,
    fmt: str = "json",
    batch_rows: int = 10_000,
    topic: str | None = None,
    progress: bool = True,
) -> int:
    """Send ``df`` (series, ts, value) to Kafka in event-time order; return the rows sent.

    With a ``speed``, a row with event time ``ts`` is sent at
    ``start + (ts - ts0) / speed`` of wall-clock time.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.kafka.clients import make_producer
    from pipeline.kafka.partitioning import partition_for

    topic = topic or settings.topics.observations
    producer = make_producer(settings)
    n_partitions = len(producer.partitions_for(topic))
    ts = df["ts"].to_numpy()
    t0 = int(ts[0]) if df.height else 0
    wall0 = time.monotonic()
    chunk = batch_rows if fmt == "arrow" else 2_000
    sent = 0
    columns = [TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("replay", total=df.height)
        while sent < df.height:
            end = min(sent + chunk, df.height)
            if speed is not None:
                end = min(end, _due_rows(ts, sent, t0, wall0, speed))
            part = df.slice(sent, end - sent)
            if fmt == "arrow":
                # Each series must stay on one partition (as with keyed JSON messages), so a
                # batch is split by the partition its series' keys hash to.
                parts = part.with_columns(
                    pl.col("series").map_elements(lambda s: partition_for(s, n_partitions), pl.Int64).alias("_p")
                )
                for (p,), rows in parts.group_by("_p", maintain_order=True):
                    producer.send(topic, arrow_message(rows.drop("_p"), settings), partition=int(p),
                                  headers=ARROW_HEADERS)
            else:
                for key, value in zip(part["series"].to_list(), json_messages(part, settings), strict=True):
                    producer.send(topic, value, key=key.encode())
            sent = end
            bar.update(task, completed=sent)
        producer.flush()
    producer.close()
    log.info("replayed %d observations into %s", sent, topic)
    return sent


def _due_rows(ts: np.ndarray, start: int, t0: int, wall0: float, speed: float) -> int:
    """Index one past the last row due now (event time replayed at ``speed``); sleeps until
    at least row ``start`` is due."""
    due_s = wall0 + (ts[start] - t0) / 1000.0 / speed
    delay = due_s - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    now_event = t0 + (time.monotonic() - wall0) * speed * 1000.0
    return max(start + 1, int(np.searchsorted(ts, now_event, side="right")))


def run(settings: Settings, args: argparse.Namespace) -> int:
    path = resolve_dataset(args.file)
    cols = ColumnMap(args.series_col, args.ts_col, args.value_col, args.series)
    df = load_observations(path, cols)
    if args.limit is not None:
        df = df.head(args.limit)
    speed = parse_speed(args.speed)
    sent = replay(
        settings, df, speed=speed, fmt=args.format, batch_rows=args.batch_rows,
        topic=args.topic, progress=not args.no_progress,
    )
    print(f"replayed {sent} observations from {path.name} into {args.topic or settings.topics.observations}")
    return 0
