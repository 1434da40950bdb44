"""Rolling-origin accuracy of every deep model and the baselines on the bundled real datasets.

Sensors (judged against seasonal naive): Victoria electricity demand and temperature
(half-hourly 2014, resampled to hourly windows, season m = 24, with calendar features)
and England & Wales demand (half-hourly, m = 48). Prices (judged against naive, m = 1,
one step per trading day): the four EU indices and MSFT. Each model is fitted once on
everything before the first test origin (the last 10% of that span for early stopping
and for choosing the best epoch, the untrained seasonal-naive/naive start included),
then forecasts every H steps through the test span. Each fit draws its samples as a training cycle
does (models.train.sampling.training_samples): --samples-per-epoch (series, time) pairs anew each
epoch (train.samples_per_epoch; every pair once when the span holds fewer) and a fixed draw of
train.validation_samples, seeded by 0. Prints one markdown table per dataset.
Usage: python benchmarks/accuracy.py [--epochs N] [--datasets a,b] [--models a,b]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, NamedTuple

from models import available_models
from models.data import windows_to_matrix
from models.train.backtest import rolling_origin
from pipeline.config import SAMPLES_PER_EPOCH, TrainSettings
from pipeline.datasets import ColumnMap, load_observations, observations_to_windows, resolve_dataset


class Dataset(NamedTuple):
    file: str
    columns: ColumnMap
    step: str
    target: str
    context: int
    horizon: int
    season: int
    origins: int
    config: dict[str, Any]


PRICES = ColumnMap("symbol", "date", "close")
DATASETS = {
    "victoria": Dataset("victoria_electricity_halfhourly.csv", ColumnMap(), "1h", "mean", 96, 24, 24, 28,
                        {"calendar": True}),
    "england_wales": Dataset("electricity_halfhourly.csv", ColumnMap(), "30m", "mean", 144, 48, 48, 14,
                             {"calendar": True}),
    "eu_stocks": Dataset("eu_stocks_daily.csv", PRICES, "index", "last", 64, 5, 1, 40, {}),
    "msft": Dataset("msft_daily.csv", PRICES, "index", "last", 64, 5, 1, 40, {}),
}
MODELS = ("naive", "seasonal_naive", "tcn", "lstm", "pyramid", "hrnn")
TRAINING = {"learning_rate": 2e-3, "weight_decay": 1e-4, "optimizer": "adamw", "dropout": 0.1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--samples-per-epoch", type=int, default=SAMPLES_PER_EPOCH,
                        help="train.samples_per_epoch of every fit (default: the setting's default)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default=",".join(m for m in MODELS if m in available_models()))
    args = parser.parse_args()
    train = TrainSettings(samples_per_epoch=args.samples_per_epoch)
    t_all = time.perf_counter()
    for key in args.datasets.split(","):
        d = DATASETS[key]
        obs = load_observations(resolve_dataset(d.file), d.columns)
        data = windows_to_matrix(observations_to_windows(obs, d.step), d.target)
        print(f"\n#### {key} ({d.file}): {len(data.series)} series x {data.values.shape[1]} steps of {d.step}, "
              f"target {d.target}, L={d.context}, H={d.horizon}, m={d.season}, {d.origins} origins, "
              f"training {TRAINING | d.config}, {train.samples_per_epoch} samples per epoch, "
              f"<= {args.epochs} epochs, patience {args.patience}, batch {args.batch_size}\n")
        print("| model | MAE | RMSE | sMAPE % | MASE | coverage 80% | rel. MAE vs naive "
              "| rel. MAE vs seasonal naive | best epoch / run | fit s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in args.models.split(","):
            t0 = time.perf_counter()
            config = {"context": d.context, "horizon": d.horizon, "season": d.season, "base_lag": d.season}
            if name not in ("naive", "seasonal_naive"):
                config |= TRAINING | d.config
            r = rolling_origin(name, data, n_origins=d.origins, season=d.season, config=config,
                               max_epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, seed=0,
                               train=train)
            s = r.metrics
            epochs = f"{r.fits[0].best_epoch} / {r.fits[0].epochs}" if r.fits else "-"
            print(f"| {name} | {s['mae']:.4g} | {s['rmse']:.4g} | {s['smape']:.3g} | {s['mase']:.3f} | "
                  f"{s['coverage']:.2f} | {s['rel_mae_naive']:.3f} | {s['rel_mae_seasonal_naive']:.3f} | "
                  f"{epochs} | {time.perf_counter() - t0:.0f} |", flush=True)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
