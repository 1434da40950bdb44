"""Replaying a dataset into Kafka as a producer would: rows in event-time order, paced by event time
(or as fast as possible), one JSON observation per message keyed by series id or Arrow IPC batches
split by partition; and waiting until ingest has written what was replayed.

`rollcast replay` sends a file with :func:`replay`; `rollcast demo` and the live-coverage benchmark
also wait for the windows with :func:`wait_for_windows`.

>>> parse_speed("max") is None, parse_speed("3600")
(True, 3600.0)
"""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.config import Settings
from pipeline.errors import DatasetError, RollcastError
from pipeline.kafka.headers import ARROW_HEADERS

log = logging.getLogger("rollcast.replay")


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


def split_at(df: pl.DataFrame, fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The observations up to the ``fraction`` quantile of event time (the nearest one), and the rest."""
    cut = df["ts"].quantile(fraction, "nearest")
    return df.filter(pl.col("ts") <= cut), df.filter(pl.col("ts") > cut)


def wait_for_windows(settings: Settings, history: pl.DataFrame, timeout_s: float) -> None:
    """Wait until the store holds every series' windows up to its last replayed observation."""
    from pipeline.store import HistoryStore

    length = settings.window.length_ms
    last = history.group_by("series").agg(pl.col("ts").max())
    want = {s: (t // length + 1) * length for s, t in last.iter_rows()}
    store = HistoryStore(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        have = store.max_window_end()
        if all(have.get(s, 0) >= end for s, end in want.items()):
            print(f"ingest has written {store.count()} windows to {store.root}", flush=True)
            return
        if time.monotonic() > deadline:
            raise RollcastError(f"ingest did not write the replayed windows within {timeout_s:g}s; "
                                f"see {settings.data_dir / 'logs' / 'ingest.log'}")
        time.sleep(1.0)
