"""Rolling-origin accuracy of every deep model and the baselines on two bundled datasets.

temperature_hourly (sensor, season 24, target mean) and msft_daily (prices,
one step per trading day, naive as the reference). Prints one markdown table
per dataset. Usage: python benchmarks/accuracy.py [--epochs N] [--last N]
"""

from __future__ import annotations

import argparse
import time

from jobs.backtest import observations_to_windows
from jobs.replay import ColumnMap, load_observations, resolve_dataset
from models import available_models
from models.backtest import rolling_origin
from models.data import windows_to_matrix

DATASETS = {
    # name: (file, columns, step, target, context, horizon, season)
    "temperature (sensor)": ("temperature_hourly.csv", ColumnMap(), "1h", "mean", 96, 24, 24),
    "msft (prices)": ("msft_daily.csv", ColumnMap("symbol", "date", "close"), "index", "last", 64, 5, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--last", type=int, default=3000, help="steps per series used (most recent)")
    parser.add_argument("--test-windows", type=int, default=10)
    parser.add_argument("--models", default=",".join(available_models()))
    args = parser.parse_args()
    for title, (file, cols, step, target, L, H, m) in DATASETS.items():
        obs = load_observations(resolve_dataset(file), cols)
        data = windows_to_matrix(observations_to_windows(obs, step), target)
        n = data.values.shape[1]
        data = data.slice(max(0, n - args.last), n)
        print(f"\n### {title}: {len(data.series)} series x {data.values.shape[1]} steps, L={L}, H={H}, m={m}, "
              f"{args.test_windows} origins, {args.epochs} epochs max\n")
        print("| model | MAE | RMSE | sMAPE % | MASE | coverage 80% | rel. MAE vs naive | rel. MAE vs seasonal naive | fit s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.models.split(","):
            t0 = time.perf_counter()
            config = {"context": L, "horizon": H, "season": 0 if name == "naive" else m}
            r = rolling_origin(name, data, n_origins=args.test_windows, season=m, config=config,
                               max_epochs=args.epochs, batch_size=256, seed=0)
            s = r.metrics
            print(f"| {name} | {s['mae']:.4g} | {s['rmse']:.4g} | {s['smape']:.3g} | {s['mase']:.3f} | "
                  f"{s['coverage']:.2f} | {s['rel_mae_naive']:.3f} | {s['rel_mae_seasonal_naive']:.3f} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
