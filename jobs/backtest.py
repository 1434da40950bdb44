"""Rolling-origin backtest of forecasting models on a dataset file or a history store.

Each model is fitted on the data before the first test origin (refitted every
--refit-every origins if given), then forecasts H steps at each of
--test-windows origins, --origin-every steps apart (default H: the forecasts
tile the last --test-windows * H steps; 1: an origin every window, as the live
forecast job forecasts), through the same predict path as the live forecast
job. The quantiles are also calibrated online, origin after origin, as the
forecast job serves them (quantile tracking with the calibration.* settings;
models.train.backtest.calibrate_sequentially), unless --no-calibration or
calibration.enabled (or scoring.enabled) is false. Every fit draws its samples
as the train job does (train.samples_per_epoch pairs anew each epoch, a fixed
draw of train.validation_samples from the last train.validation_fraction of
the span, seeded by model.seed). Prints a table of MAE, RMSE,
sMAPE, MASE, coverage of the model's outer interval and of the calibrated one
(both without the first --burn-in origins), and MAE relative to naive and
seasonal naive (over all origins), and writes metrics.csv plus one PNG of
forecasts vs actuals per model to --out.
Input is a long-format CSV/Parquet file (resampled onto a --step grid) or a
directory of window Parquet files (the history store).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.config import Settings

HELP = "rolling-origin backtest of models and baselines on a dataset or the history store"


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
    parser.add_argument("--test-windows", type=_positive, default=10,
                        help="number of origins, the last one H steps before the end (default: 10)")
    parser.add_argument("--origin-every", type=_positive, metavar="K",
                        help="steps between origins (default: H, forecasts tiling the test span; 1: an origin "
                        "every window, as the forecast job forecasts). Closer than H, forecasts overlap: every "
                        "metric averages all origins' forecasts, so a step counts once per forecast covering it; "
                        "the plots draw only forecasts of origins at least H apart")
    parser.add_argument("--burn-in", type=_non_negative, default=0, metavar="N",
                        help="leave the first N origins' forecasts out of coverage and calibrated coverage (they "
                        "still feed the calibration; the offsets start from 0 at the first origin); MAE, RMSE, "
                        "sMAPE, MASE and relative MAE stay over all origins (default: 0, every origin counts)")
    parser.add_argument("--refit-every", type=_positive,
                        help="refit the model every K origins, i.e. every K * --origin-every steps (default: never)")
    parser.add_argument("--max-epochs", type=int, help="training epochs (default: model.max_epochs)")
    parser.add_argument("--last", type=int, help="use only the last N steps of every series")
    parser.add_argument("--out", type=Path, help="output directory (default: DATA_DIR/backtests/<source>)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="do not calibrate the quantiles (default: calibrate as the forecast job does, with the "
                        "calibration.* settings, starting from split-conformal offsets of the fit's validation span, "
                        "when calibration.enabled)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def run(settings: Settings, args: argparse.Namespace) -> int:
    from models import available_models
    from models.data import windows_to_matrix
    from models.registry import config_from_settings
    from models.train import report
    from models.train.backtest import BASELINES, check_burn_in
    from pipeline.datasets import ColumnMap
    from pipeline.errors import ModelConfigError

    ms = settings.model
    names = args.models.split(",") if args.models else [*ms.types, *BASELINES]
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in available_models()]
    if unknown:
        raise ModelConfigError(f"unknown model(s) {unknown}; known models: {', '.join(available_models())}")
    context, horizon = args.context or ms.context, args.horizon or ms.horizon
    check_burn_in(args.burn_in, args.test_windows)
    season = args.season or ms.season
    target = args.target or settings.window.target
    windows, source_name = report.read_windows(args.source, settings,
                                               ColumnMap(args.series_col, args.ts_col, args.value_col), args.step)
    data = windows_to_matrix(windows, target)
    if args.last:
        data = data.slice(max(0, data.values.shape[1] - args.last), data.values.shape[1])
    out = args.out or settings.data_dir / "backtests" / source_name
    out.mkdir(parents=True, exist_ok=True)
    console = report.console()
    every = args.origin_every or horizon
    console.print(f"{source_name}: {len(data.series)} series x {data.values.shape[1]} steps, target {target}, "
                  f"L={context}, H={horizon}, m={season}, {args.test_windows} test windows "
                  f"(origins {every} step(s) apart), burn-in {args.burn_in} origin(s)")
    # the forecast job calibrates when it scores (scoring.enabled) and calibration.enabled
    calibration = settings.calibration if (settings.scoring.enabled and settings.calibration.enabled
                                           and not args.no_calibration) else None
    if calibration is not None:
        start = ("split-conformal offsets from the fit's validation span" if calibration.start == "holdout"
                 else "the model's own quantiles")
        console.print(f"calibration: online, as the forecast job (experts "
                      f"{', '.join(f'{r:g}' for r in calibration.expert_rates)}, guard {calibration.learning_rate:g}, "
                      f"offsets within +-{calibration.max_offset:g} widths, on_new_champion="
                      f"{calibration.on_new_champion}), from {start} at the first origin")
    else:
        console.print("calibration: off")

    def config_for(name: str) -> dict[str, Any]:
        return config_from_settings(ms, name, context=context, horizon=horizon, season=season, base_lag=season)

    results = report.backtest_models(
        names, data, config_for, console=console, progress=not args.no_progress, n_origins=args.test_windows,
        season=season, refit_every=args.refit_every, max_epochs=args.max_epochs or ms.max_epochs,
        batch_size=ms.batch_size, seed=ms.seed, train=settings.train, calibration=calibration,
        origin_every=every, burn_in=args.burn_in,
    )
    report.write_report(console, out, results, data, every)
    return 0
