"""What `rollcast backtest` does around :func:`~models.train.backtest.rolling_origin`: read the windows of a
dataset file, a directory of window files or the history store; backtest each model under one progress
bar; print the table of metrics and write ``metrics.csv`` and one plot per model.

``metrics.csv`` has one row per model: ``model``, the :data:`METRIC_COLUMNS` (NaN for calibrated coverage
when calibration is off), then ``origins`` (their number), ``origin_every`` (steps between them) and
``coverage_burn_in_origins`` (how many of the first origins coverage and calibrated coverage leave out;
the point metrics count every origin).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from models.data import SeriesMatrix
from models.train.backtest import BacktestResult, rolling_origin
from pipeline.config import Settings
from pipeline.datasets import ColumnMap
from pipeline.errors import DatasetError
from pipeline.quantiles import interval_indices

METRIC_COLUMNS = ("mae", "rmse", "smape", "mase", "coverage", "calibrated_coverage", "rel_mae_naive",
                  "rel_mae_seasonal_naive")


def read_windows(source: str | None, settings: Settings, columns: ColumnMap, step: str) -> tuple[pl.DataFrame, str]:
    """The window table to backtest on and a short name of its source: the history store (``source`` None),
    a directory of window Parquet files, or a long-format dataset file resampled onto ``step``."""
    from pipeline.datasets import load_observations, observations_to_windows, resolve_dataset

    if not source:
        from pipeline.store import HistoryStore

        store = HistoryStore(settings)  # a local directory or an object-store URI (storage.history)
        windows = store.read()
        if windows.height == 0:
            raise DatasetError(f"the history store {store.location} is empty; run `rollcast ingest` first "
                               "or pass a dataset file")
        return windows, "history"
    path = Path(source)
    if path.is_dir():
        # names starting with "_" or "." are hidden, as for every Parquet dataset reader: a history
        # store's staging (`_pending/`) and progress records are not windows
        files = sorted(f for f in path.glob("**/*.parquet")
                       if not any(part.startswith(("_", ".")) for part in f.relative_to(path).parts))
        if not files:
            raise DatasetError(f"{path} holds no window Parquet files (**/*.parquet)")
        try:
            return pl.scan_parquet(files, hive_partitioning=False).collect(), path.name or "history"
        except pl.exceptions.PolarsError as e:
            raise DatasetError(f"cannot read the window files in {path}: {e}") from e
    resolved = resolve_dataset(str(path))
    return observations_to_windows(load_observations(resolved, columns), step), resolved.stem


def console() -> Any:
    """A rich console; off a terminal (logs and pipes) 160 columns wide, so that the table is never truncated."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=160)


def backtest_models(names: list[str], data: SeriesMatrix, config_for: Callable[[str], dict[str, Any]], *,
                    console: Any, progress: bool, n_origins: int, **kwargs: Any) -> list[BacktestResult]:
    """:func:`~models.train.backtest.rolling_origin` of each model in ``names`` (built with ``config_for(name)``)
    on ``data``, in order, under one progress bar of every model's origins (none unless ``progress``);
    ``kwargs`` go to ``rolling_origin``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("backtest", total=len(names) * n_origins)
        for name in names:
            bar.update(task, description=f"{name}")
            results.append(rolling_origin(name, data, n_origins=n_origins, config=config_for(name),
                                          on_origin=lambda _i: bar.advance(task), **kwargs))
    return results


def write_report(console: Any, out: Path, results: list[BacktestResult], data: SeriesMatrix, every: int) -> None:
    """Print the table, write ``out/metrics.csv`` and ``out/forecast_<model>.png`` per model, and say so."""
    from models.plots import plot_backtest

    print_table(console, results)
    write_csv(out / "metrics.csv", results, every)
    for r in results:
        plot_backtest(out / f"forecast_{r.model}.png", r, data)
    console.print(f"wrote {out / 'metrics.csv'} and {len(results)} plot(s) to {out}")


def print_table(console: Any, results: list[BacktestResult]) -> None:
    from rich.table import Table

    title = "rolling-origin backtest"
    if results:
        r = results[0]
        qs, n = r.quantiles, len(r.origins)
        lo, hi = interval_indices(qs)
        title += f" (interval q{qs[lo]:g}-q{qs[hi]:g}, nominal coverage {qs[hi] - qs[lo]:.2g}"
        if r.burn_in:
            title += (f"; coverage and calibrated coverage over origins {r.burn_in + 1}-{n}, the first "
                      f"{r.burn_in} (burn-in) excluded; other metrics over all {n} origins")
        title += ")"
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    for col in ("MAE", "RMSE", "sMAPE %", "MASE", "coverage", "calibrated coverage", "rel. MAE naive",
                "rel. MAE s-naive"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.model, *("off" if c not in r.metrics else _fmt(r.metrics[c]) for c in METRIC_COLUMNS))
    console.print(table)


def _metric(result: BacktestResult, column: str) -> float:
    """A metric of ``result``; NaN for calibrated coverage when calibration is off."""
    return result.metrics.get(column, float("nan"))


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4g}"


def write_csv(path: Path, results: list[BacktestResult], every: int) -> None:
    rows = [{"model": r.model, **{c: _metric(r, c) for c in METRIC_COLUMNS}, "origins": len(r.origins),
             "origin_every": every, "coverage_burn_in_origins": r.burn_in} for r in results]
    pl.DataFrame(rows).write_csv(path)
