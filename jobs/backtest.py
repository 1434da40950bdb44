"""Rolling-origin backtest of forecasting models on a dataset file or a history store.

Each model is fitted on the data before the first test origin (refitted every
--refit-every origins if given), then forecasts H steps at every origin, H
steps apart, through the last --test-windows * H steps, through the same
predict path as the live forecast job. Prints a table of MAE, RMSE, sMAPE,
MASE, interval coverage and MAE relative to naive and seasonal naive, and
writes metrics.csv plus one PNG of forecasts vs actuals per model to --out.
Input is a long-format CSV/Parquet file (resampled onto a --step grid) or a
directory of window Parquet files (the history store).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.aggregators import DEFAULT_AGGREGATORS
from pipeline.config import Settings
from pipeline.errors import DatasetError

HELP = "rolling-origin backtest of models and baselines on a dataset or the history store"
BASELINES = ("naive", "seasonal_naive")
UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="dataset file (CSV/Parquet, or a bundled dataset name) or "
                        "a directory of window Parquet files (default: the history store)")
    parser.add_argument("--series-col", default="series", help="column with the series id (default: series)")
    parser.add_argument("--ts-col", default="ts", help="column with the time, ISO-8601 or epoch ms (default: ts)")
    parser.add_argument("--value-col", default="value", help="column with the value (default: value)")
    parser.add_argument("--step", default="auto",
                        help="grid step for a dataset file: e.g. 30min, 1h, 1d; 'auto' = the median spacing; "
                        "'index' = one step per observation (trading days)")
    parser.add_argument("--target", help="window aggregate to forecast (default: window.target)")
    parser.add_argument("--models", help="comma-separated models (default: model.types plus the baselines)")
    parser.add_argument("--context", type=int, help="L: context windows (default: model.context)")
    parser.add_argument("--horizon", type=int, help="H: steps forecast (default: model.horizon)")
    parser.add_argument("--season", type=int, help="m for seasonal naive and MASE (default: model.season)")
    parser.add_argument("--test-windows", type=int, default=10, help="origins, H steps apart (default: 10)")
    parser.add_argument("--refit-every", type=int, help="refit the model every K origins (default: never)")
    parser.add_argument("--max-epochs", type=int, help="training epochs (default: model.max_epochs)")
    parser.add_argument("--last", type=int, help="use only the last N steps of every series")
    parser.add_argument("--out", type=Path, help="output directory (default: DATA_DIR/backtests/<source>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def read_windows(args: argparse.Namespace, settings: Settings) -> tuple[pl.DataFrame, str]:
    """The window table to backtest on and a short name of its source."""
    from jobs.replay import ColumnMap, load_observations, resolve_dataset

    if not args.source:
        from pipeline.store import HistoryStore

        store = HistoryStore(settings)  # a local directory or an object-store URI (storage.history)
        windows = store.read()
        if windows.height == 0:
            raise DatasetError(f"the history store {store.location} is empty; run `rollcast ingest` first "
                               "or pass a dataset file")
        return windows, "history"
    source = Path(args.source)
    if source.is_dir():
        # names starting with "_" or "." are hidden, as for every Parquet dataset reader: a history
        # store's staging (`_pending/`) and progress records are not windows
        files = sorted(f for f in source.glob("**/*.parquet")
                       if not any(part.startswith(("_", ".")) for part in f.relative_to(source).parts))
        if not files:
            raise DatasetError(f"{source} holds no window Parquet files (**/*.parquet)")
        try:
            return pl.scan_parquet(files, hive_partitioning=False).collect(), source.name or "history"
        except pl.exceptions.PolarsError as e:
            raise DatasetError(f"cannot read the window files in {source}: {e}") from e
    path = resolve_dataset(str(source))
    obs = load_observations(path, ColumnMap(args.series_col, args.ts_col, args.value_col))
    return observations_to_windows(obs, args.step), path.stem


def run(settings: Settings, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models import available_models
    from models.backtest import rolling_origin
    from models.data import windows_to_matrix
    from pipeline.errors import ModelConfigError

    ms = settings.model
    names = args.models.split(",") if args.models else [*ms.types, *BASELINES]
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in available_models()]
    if unknown:
        raise ModelConfigError(f"unknown model(s) {unknown}; known models: {', '.join(available_models())}")
    context, horizon = args.context or ms.context, args.horizon or ms.horizon
    season = args.season or ms.season
    target = args.target or settings.window.target
    windows, source_name = read_windows(args, settings)
    data = windows_to_matrix(windows, target)
    if args.last:
        data = data.slice(max(0, data.values.shape[1] - args.last), data.values.shape[1])
    out = args.out or settings.data_dir / "backtests" / source_name
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: never truncate the table
    console.print(f"{source_name}: {len(data.series)} series x {data.values.shape[1]} steps, target {target}, "
                  f"L={context}, H={horizon}, m={season}, {args.test_windows} test windows")

    results = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=args.no_progress) as bar:
        task = bar.add_task("backtest", total=len(names) * args.test_windows)
        for name in names:
            bar.update(task, description=f"{name}")
            config: dict[str, Any] = {"context": context, "horizon": horizon, "quantiles": ms.quantiles,
                                      "learning_rate": ms.learning_rate, "seed": ms.seed,
                                      "season": season, "base_lag": season}
            config.update(ms.params.get(name, {}))
            results.append(rolling_origin(
                name, data, n_origins=args.test_windows, season=season, config=config,
                refit_every=args.refit_every, max_epochs=args.max_epochs or ms.max_epochs,
                batch_size=ms.batch_size, seed=ms.seed,
                on_origin=lambda _i: bar.advance(task),
            ))
    _print_table(console, results)
    _write_csv(out / "metrics.csv", results)
    for r in results:
        _plot(out / f"forecast_{r.model}.png", r, data)
    console.print(f"wrote {out / 'metrics.csv'} and {len(results)} plot(s) to {out}")
    return 0


METRIC_COLUMNS = ("mae", "rmse", "smape", "mase", "coverage", "rel_mae_naive", "rel_mae_seasonal_naive")


def _print_table(console: Any, results: list[Any]) -> None:
    from rich.table import Table

    table = Table(title="rolling-origin backtest")
    table.add_column("model", no_wrap=True)
    for col in ("MAE", "RMSE", "sMAPE %", "MASE", "coverage", "rel. MAE naive", "rel. MAE s-naive"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.model, *(_fmt(r.metrics[c]) for c in METRIC_COLUMNS))
    console.print(table)


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4g}"


def _write_csv(path: Path, results: list[Any]) -> None:
    rows = [{"model": r.model, **{c: r.metrics[c] for c in METRIC_COLUMNS}} for r in results]
    pl.DataFrame(rows).write_csv(path)


def _plot(path: Path, result: Any, data: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_series = min(4, len(result.series))
    fig, axes = plt.subplots(n_series, 1, figsize=(10, 2.6 * n_series), squeeze=False)
    s_, o_, h_, q_ = result.forecasts.shape
    fc = result.forecasts.reshape(s_, o_ * h_, q_)  # origins are H apart: forecasts tile the test span
    act = result.actuals.reshape(s_, o_ * h_)
    t = np.arange(result.origins[0], result.origins[0] + o_ * h_)
    mid = result.quantiles.index(0.5)
    for i, ax in enumerate(axes[:, 0]):
        start = max(0, result.origins[0] - h_)
        ax.plot(np.arange(start, result.origins[0]), data.values[i, start : result.origins[0]], color="0.5", lw=1)
        ax.plot(t, act[i], color="black", lw=1, label="actual")
        ax.plot(t, fc[i, :, mid], color="tab:blue", lw=1, label="median forecast")
        if q_ > 1:
            ax.fill_between(t, fc[i, :, 0], fc[i, :, -1], color="tab:blue", alpha=0.2,
                            label=f"{result.quantiles[0]:g}-{result.quantiles[-1]:g}")
        for o in result.origins:
            ax.axvline(o, color="0.85", lw=0.5)
        ax.set_title(f"{result.model}: {result.series[i]}", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
