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
from pipeline.kafka.clients import make_producer
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
    return _collect(settings, settings.topics.forecasts, "forecasts", expected, timeout)


def collect_scores(settings: Settings, expected: set[tuple[str, int]], timeout: float) -> dict:
    """All score messages, by (series, last_window_end), read until every ``expected`` one is there."""
    return _collect(settings, settings.topics.scores, "scores", expected, timeout)


def _collect(settings: Settings, topic: str, what: str, expected: set[tuple[str, int]], timeout: float) -> dict:
    seen: dict[tuple[str, int], list[dict]] = {}
    read = [0]

    def covered(records: list) -> bool:
        for rec in records[read[0]:]:
            msg = json.loads(rec.value)
            assert rec.key.decode() == msg["series"]
            seen.setdefault((msg["series"], msg["last_window_end"]), []).append(msg)
        read[0] = len(records)
        return expected <= seen.keys()

    read_topic(settings, topic, covered, timeout=timeout)
    missing = expected - seen.keys()
    assert not missing, f"timed out after {timeout:g}s: {what} missing for {sorted(missing)[:10]}"
    return seen


def offline_scores(forecasts: dict[tuple[str, int], dict], windows: pl.DataFrame, season: int
                   ) -> dict[tuple[str, int], list[dict | None]]:
    """Each forecast's score computed independently from its message and the windows: per step the
    absolute error of the mean, the pinball loss of each served quantile, whether the actual is inside
    the served and the model's outer interval, and seasonal naive's error (gap rule: carry forward)."""
    by_series = {s: dict(zip(p["window_end"].to_list(), np.where(p["count"].to_numpy() > 0,
                                                                  p["mean"].fill_null(np.nan).to_numpy(), np.nan),
                             strict=True))
                 for (s,), p in windows.group_by("series")}
    out = {}
    for (s, end), msg in forecasts.items():
        values = by_series[s]
        ctx = np.array([values.get(end - (L - 1 - i) * STEP, np.nan) for i in range(L)])
        known = np.flatnonzero(~np.isnan(ctx))
        filled = ctx.copy()
        for i in range(L):  # carry the last known value forward; before the first, that first value
            if np.isnan(filled[i]):
                filled[i] = filled[i - 1] if i > 0 and not np.isnan(filled[i - 1]) else ctx[known[0]]
        m = min(season, L)
        pts: list[dict | None] = []
        for h, point in enumerate(msg["points"]):
            y = values.get(end + (h + 1) * STEP, np.nan)
            if np.isnan(y):
                pts.append(None)
                continue
            q = {k: float(v) for k, v in point["quantiles"].items()}
            mq = point.get("model_quantiles", point["quantiles"])
            naive = filled[L - m + h % m]
            pts.append({"abs_error": abs(y - point["mean"]),
                        "pinball": {k: max(float(k) * (y - v), (float(k) - 1) * (y - v)) for k, v in q.items()},
                        "inside": min(q.values()) <= y <= max(q.values()),
                        "model_inside": min(mq.values()) <= y <= max(mq.values()),
                        "naive_abs_error": abs(y - naive)})
        out[(s, end)] = pts
    return out
