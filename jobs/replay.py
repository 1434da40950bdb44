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

from pipeline.config import Settings
from pipeline.datasets import ColumnMap, load_observations, resolve_dataset
from pipeline.replay import parse_speed, replay

HELP = "produce a CSV or Parquet dataset into the observations topic"


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
