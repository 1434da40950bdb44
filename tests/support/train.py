"""History and settings for the train job's tests: real Parquet history, a real MLflow server."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.config import Settings, load_settings
from pipeline.datasets import ColumnMap, load_observations, resolve_dataset
from pipeline.store import HistoryStore, Progress

HOUR_MS = 3_600_000

TINY = '{tcn = {channels_hidden = 8, dropout = 0.0}, lstm = {hidden = 8, layers = 1, dropout = 0.0}}'
# One epoch: a weak model that still beats seasonal naive on the drifting series.
WEAK = {
    "ROLLCAST_MODEL__PARAMS": TINY,
    "ROLLCAST_MODEL__MAX_EPOCHS": "1",
    "ROLLCAST_MODEL__LEARNING_RATE": "0.01",
    "ROLLCAST_MODEL__BATCH_SIZE": "128",
    "ROLLCAST_TRAIN__SPAN_WINDOWS": "800",
    "ROLLCAST_TRAIN__HOLDOUT_WINDOWS": "96",
    "ROLLCAST_KAFKA__CLIENT": '{sasl_plain_username = "svc", sasl_plain_password = "hunter2-secret"}',
}


def write_history(settings: Settings, hours: int, offset: int = 0, dataset: str = "temperature_hourly.csv") -> pl.DataFrame:
    """Write hourly windows of a bundled dataset into the history store through its writer.

    Takes ``hours`` consecutive hours per series, starting ``offset`` hours into
    the dataset; returns the windows written.
    """
    obs = load_observations(resolve_dataset(dataset), ColumnMap())
    t0 = int(obs["ts"].min()) + offset * HOUR_MS
    obs = obs.filter((pl.col("ts") >= t0) & (pl.col("ts") < t0 + hours * HOUR_MS))
    windows = (
        obs.with_columns(window_start=(pl.col("ts") // HOUR_MS) * HOUR_MS)
        .group_by("series", "window_start")
        .agg(
            count=pl.len().cast(pl.Int64),
            first=pl.col("value").first(),
            last=pl.col("value").last(),
            min=pl.col("value").min(),
            max=pl.col("value").max(),
            mean=pl.col("value").mean(),
            sum=pl.col("value").sum(),
        )
        .with_columns(window_end=pl.col("window_start") + HOUR_MS)
        .select("series", "window_start", "window_end", "count", "first", "last", "min", "max", "mean", "sum")
        .sort("series", "window_start")
    )
    write_windows(settings, windows)
    return windows


def drifting_daily_windows(
    hours: int, n_series: int = 3, seed: int = 0, start_ms: int = 1_700_000_000_000 // HOUR_MS * HOUR_MS
) -> pl.DataFrame:
    """Hourly sensor-like windows: a random-walk level plus a daily cycle plus noise, per series.

    The level drifts over a day, so seasonal naive (the value 24 h ago) is off
    by the day's drift, and naive (the last value) by the daily cycle; a model
    that takes the level from the last windows and the shape from the last
    days beats both after a few epochs of training.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(hours)
    frames = []
    for s in range(n_series):
        level = 20 + 10 * s + np.cumsum(rng.normal(0, 0.5, hours))
        y = level + (4 + s) * np.sin(2 * np.pi * (t + rng.uniform(0, 24)) / 24) + rng.normal(0, 0.3, hours)
        starts = start_ms + t * HOUR_MS
        frames.append(pl.DataFrame({
            "series": [f"sensor-{s}"] * hours, "window_start": starts, "window_end": starts + HOUR_MS,
            "count": np.ones(hours, dtype=np.int64), "first": y, "last": y, "min": y, "max": y, "mean": y, "sum": y,
        }))
    return pl.concat(frames).sort("series", "window_start")


def write_windows(settings: Settings, windows: pl.DataFrame) -> None:
    """Append ``windows`` to the history store through its checkpoint writer."""
    store = HistoryStore(settings)
    previous = store.recover("test", 0)
    position = (previous.position if previous else 0) + windows.height
    store.write_checkpoint("test", 0, windows, Progress(position=position, max_ts=int(windows["window_end"].max())))


def train_env(tracking_uri: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """``ROLLCAST_*`` variables for a tiny, fast training setup with its own model and experiment."""
    suffix = uuid.uuid4().hex[:8]
    env = {
        "ROLLCAST_DATA_DIR": str(data_dir),
        "ROLLCAST_MLFLOW__TRACKING_URI": tracking_uri,
        "ROLLCAST_MLFLOW__REGISTERED_MODEL": f"forecaster-{suffix}",
        "ROLLCAST_MLFLOW__EXPERIMENT": f"train-test-{suffix}",
        "ROLLCAST_MLFLOW__CONNECT_TIMEOUT_S": "5",
        "ROLLCAST_WINDOW__LENGTH_MS": str(HOUR_MS),
        "ROLLCAST_WINDOW__TARGET": "mean",
        "ROLLCAST_MODEL__TYPES": '["tcn"]',
        "ROLLCAST_MODEL__CONTEXT": "48",
        "ROLLCAST_MODEL__HORIZON": "12",
        "ROLLCAST_MODEL__SEASON": "24",
        "ROLLCAST_MODEL__MAX_EPOCHS": "3",
        "ROLLCAST_MODEL__BATCH_SIZE": "64",
        "ROLLCAST_MODEL__LEARNING_RATE": "0.003",
        "ROLLCAST_MODEL__PARAMS": '{tcn = {channels_hidden = 8, dropout = 0.0}}',
        "ROLLCAST_TRAIN__SPAN_WINDOWS": "600",
        "ROLLCAST_TRAIN__HOLDOUT_WINDOWS": "48",
        "ROLLCAST_TRAIN__VALIDATION_FRACTION": "0.1",
        "ROLLCAST_TRAIN__MAX_RETRIES": "0",
        "ROLLCAST_TRAIN__RETRY_BACKOFF_S": "0.5",
    }
    env.update(extra)
    return env


def train_settings(tracking_uri: str, data_dir: Path, **extra: str) -> Settings:
    return load_settings(env=train_env(tracking_uri, data_dir, **extra))
