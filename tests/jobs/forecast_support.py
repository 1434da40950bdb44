"""Windows and forecasts for the forecast job's tests: windows to produce, forecasts to collect, and
an offline computation to compare them with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import models
from pipeline.config import Settings
from pipeline.forecasts_io import forecast_message_chunks
from pipeline.kafka import make_producer
from pipeline.windows import WINDOW_SCHEMA
from pipeline.windows_io import WindowRouter
from tests.support import read_topic

STEP = 1000
L, H = 8, 3


def forecast_messages(*args: Any, **kwargs: Any) -> list[tuple[str, bytes]]:
    """All of :func:`forecast_message_chunks`'s messages in one list."""
    return [m for chunk in forecast_message_chunks(*args, **kwargs) for m in chunk]


def make_windows(series: list[str], n: int, start_ms: int = 1_700_000_000_000) -> pl.DataFrame:
    """A regular grid of windows per series (one gap row with count = 0 in the first series)."""
    rows = []
    for k, s in enumerate(series):
        for i in range(n):
            ws = start_ms + i * STEP
            v = 10 * (k + 1) + np.sin(i / 3) * (k + 1)
            gap = k == 0 and i == n // 2
            rows.append({
                "series": s, "window_start": ws, "window_end": ws + STEP, "count": 0 if gap else 3,
                "first": None if gap else v, "last": None if gap else v, "min": None if gap else v - 1,
                "max": None if gap else v + 1, "mean": None if gap else v, "sum": None if gap else 3 * v,
            })
    return pl.DataFrame(rows, schema=WINDOW_SCHEMA)


def offline(model_dir: Path, windows: pl.DataFrame) -> dict[tuple[str, int], list[float]]:
    """Median forecasts computed independently: all windows in memory, models.predict per window."""
    model = models.load_model(model_dir)
    out = {}
    for (s,), part in windows.sort("window_start").group_by("series", maintain_order=True):
        vals = part["mean"].to_numpy().astype(float)
        ends = part["window_end"].to_numpy()
        for i in range(L - 1, part.height):
            ctx = vals[i - L + 1 : i + 1]
            if np.isnan(ctx).all():  # the gap rule: a context without a known value is not forecast
                continue
            p = models.predict(model, ctx[None], window_end_ms=ends[i - L + 1 : i + 1][None])
            out[(s, int(ends[i]))] = p[0, :, 1].tolist()
    return out


def produce_windows(settings: Settings, windows: pl.DataFrame) -> None:
    producer = make_producer(settings)
    router = WindowRouter(settings.kafka.partitions, max_rows=7)
    for partition, value, headers in router.batch(windows):  # as ingest's checkpoint does
        producer.send(settings.topics.windows, value, partition=partition, headers=headers)
    producer.flush()
    producer.close()


def collect_forecasts(settings: Settings, expected: set[tuple[str, int]], timeout: float) -> dict:
    """All forecast messages, by (series, last_window_end), read until every ``expected`` one is there."""
    seen: dict[tuple[str, int], list[dict]] = {}
    read = [0]

    def covered(records: list) -> bool:
        for rec in records[read[0]:]:
            msg = json.loads(rec.value)
            assert rec.key.decode() == msg["series"]
            seen.setdefault((msg["series"], msg["last_window_end"]), []).append(msg)
        read[0] = len(records)
        return expected <= seen.keys()

    read_topic(settings, settings.topics.forecasts, covered, timeout=timeout)
    missing = expected - seen.keys()
    assert not missing, f"timed out after {timeout:g}s: forecasts missing for {sorted(missing)[:10]}"
    return seen
