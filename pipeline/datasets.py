"""Datasets as rollcast reads them: the bundled real datasets, observation files (CSV or Parquet) in
long format, and their resampling onto a regular grid of windows for backtests.

>>> resolve_dataset("temperature_hourly.csv").name
'temperature_hourly.csv'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.aggregators import DEFAULT_AGGREGATORS
from pipeline.errors import DatasetError

DATASETS_DIR = Path(__file__).resolve().parent / "datasets"
UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def resolve_dataset(name: str) -> Path:
    """A path as given, or the bundled dataset of that file name."""
    path = Path(name)
    if path.exists():
        return path
    bundled = DATASETS_DIR / name
    if bundled.exists():
        return bundled
    known = ", ".join(sorted(p.name for p in DATASETS_DIR.glob("*.csv")))
    raise DatasetError(f"dataset {name} not found (neither a file nor a bundled dataset: {known})")


@dataclass(frozen=True)
class ColumnMap:
    series: str = "series"
    ts: str = "ts"
    value: str = "value"
    constant_series: str | None = None


def load_observations(path: Path, cols: ColumnMap) -> pl.DataFrame:
    """Read a dataset as ``series (str), ts (int64 epoch ms), value (float64)`` sorted by event time."""
    try:
        if path.suffix in (".parquet", ".pq"):
            df = pl.read_parquet(path)
        else:
            df = pl.read_csv(path, infer_schema_length=10_000, try_parse_dates=False)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    missing = [c for c in (cols.ts, cols.value) if c not in df.columns]
    if cols.constant_series is None and cols.series not in df.columns:
        missing.append(cols.series)
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing}; it has {df.columns}. "
            "Map them with --series-col/--ts-col/--value-col, or give --series NAME for one series."
        )
    series = pl.lit(cols.constant_series) if cols.constant_series is not None else pl.col(cols.series)
    out = df.select(
        series.cast(pl.Utf8).alias("series"),
        _epoch_ms(df, cols.ts).alias("ts"),
        pl.col(cols.value).cast(pl.Float64, strict=False).alias("value"),
    )
    return out.sort("ts", maintain_order=True)


def _epoch_ms(df: pl.DataFrame, col: str) -> pl.Expr:
    dtype = df.schema[col]
    if dtype.is_integer():
        return pl.col(col).cast(pl.Int64)
    if dtype.is_float():
        return pl.col(col).cast(pl.Int64)
    if dtype == pl.Date:
        return pl.col(col).cast(pl.Datetime("ms")).dt.epoch("ms")
    if isinstance(dtype, pl.Datetime):
        return pl.col(col).dt.epoch("ms")
    text = pl.col(col).cast(pl.Utf8)
    parsed = pl.coalesce(
        text.str.to_datetime(time_unit="ms", time_zone="UTC", strict=False),
        text.str.to_datetime("%Y-%m-%d", time_unit="ms", strict=False).dt.replace_time_zone("UTC"),
        text.str.to_datetime("%Y/%m/%d %H:%M:%S", time_unit="ms", strict=False).dt.replace_time_zone("UTC"),
        text.str.to_datetime("%Y/%m/%d %H:%M", time_unit="ms", strict=False).dt.replace_time_zone("UTC"),
    )
    return parsed.dt.epoch("ms")


def parse_step(text: str) -> int:
    """``30min``, ``1h``, ``1d`` or a number of milliseconds -> milliseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or (m.group(2) or "ms") not in UNITS_MS:
        raise DatasetError(f"--step {text!r}: expected a number and a unit of {sorted(UNITS_MS)}, e.g. 1h")
    return int(float(m.group(1)) * UNITS_MS[m.group(2) or "ms"])


def observations_to_windows(obs: pl.DataFrame, step: str) -> pl.DataFrame:
    """Resample ``series, ts, value`` observations into a window table on a regular grid."""
    if obs.height == 0:
        raise DatasetError("the dataset has no rows")
    if step == "index":
        obs = obs.sort("series", "ts").with_columns(pl.int_range(pl.len()).over("series").cast(pl.Int64).alias("ts"))
        step_ms = 1
    elif step == "auto":
        diffs = obs.sort("series", "ts").select(pl.col("ts").diff().over("series").alias("d")).filter(pl.col("d") > 0)
        if diffs.height == 0:
            raise DatasetError("cannot infer --step: every series has a single timestamp")
        step_ms = int(diffs["d"].median())
    else:
        step_ms = parse_step(step)
    windows = (
        obs.drop_nulls("value")
        .with_columns((pl.col("ts") // step_ms * step_ms).alias("window_start"))
        .group_by("series", "window_start")
        .agg(*[e for a in DEFAULT_AGGREGATORS for e in a.initialize()])  # the ingest job's aggregates
        .select("series", "window_start", *[a.result().alias(a.name) for a in DEFAULT_AGGREGATORS])
        .with_columns((pl.col("window_start") + step_ms).alias("window_end"))
    )
    return windows  # gaps are filled with NaN by windows_to_matrix
