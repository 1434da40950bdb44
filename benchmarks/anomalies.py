"""Anomaly flags on a labelled public dataset: precision, recall, and the flag rate where nothing is labelled.

The dataset: UCR/KDD-2021 anomaly archive series 135, "InternalBleeding16" (heart rate, 7,501 points, one
labelled anomaly of 12 points; Wu & Keogh, "Current Time Series Anomaly Detection Benchmarks are Flawed
and are Creating the Illusion of Progress", 2021), as shipped in the `aeon` wheel (BSD-3-Clause,
`aeon/datasets/data/KDD-TSAD_135/`). The wheel is fetched with `pip download aeon==1.6.0 --no-deps` (the
package registry only) and the CSV read from it; aeon itself is not installed nor imported.

Protocol, as the forecast job flags (models.scoring.anomaly through models.train.backtest): a model is
fitted on the archive's training part (the first 1,200 points, anomaly-free by construction), then
forecasts at every point after it (`origin_every = 1`), its quantiles calibrated as the forecast job
serves them (split-conformal start from the fit's validation span, then the online tracker). The actual
at each point is judged against the served step-1 quantiles of the forecast made one point before: a
flag when it falls outside the served `anomalies.level` interval (0.98). Reported:

- flag rate away from the labelled event (more than 100 points from it): close to 1 - level when the
  intervals are calibrated (the flags follow them);
- point-wise precision and recall against the 12 labelled points;
- event-wise: the event is detected when a flag falls within 100 points of it (the archive's tolerance),
  and whether the lowest tail probability of the whole test part lies there (the archive's top-1 score).

    PYTHONPATH=. python benchmarks/anomalies.py [--models tcn,seasonal_naive] [--max-epochs 20]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from models.data import SeriesMatrix
from models.scoring.anomaly import outside, tail_probability
from models.train.backtest import rolling_origin
from pipeline.config import load_settings
from pipeline.quantiles import level_indices

WHEEL = "aeon==1.6.0"
MEMBER = "aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv"
TRAIN_POINTS = 1200  # the archive's training part (its TRAIN file: the first 1,200 points, no anomaly)
TOLERANCE = 100  # points either side of the event, as the archive's scoring allows


def load(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Values and 0/1 labels of the series, from the aeon wheel (downloaded once into ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("aeon-1.6.0-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob("aeon-1.6.0-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        rows = list(csv.DictReader(io.StringIO(z.read(MEMBER).decode())))
    return (np.array([float(r["value"]) for r in rows]), np.array([int(r["is_anomaly"]) for r in rows]))


def season_of(x: np.ndarray, lo: int = 8, hi: int = 300) -> int:
    """The lag of the highest autocorrelation in ``[lo, hi]`` of ``x`` (the training part): the season of
    seasonal naive and MASE, measured rather than assumed."""
    x = x - x.mean()
    acf = [float(np.dot(x[:-k], x[k:]) / np.dot(x, x)) for k in range(lo, hi + 1)]
    return lo + int(np.argmax(acf))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tcn,seasonal_naive")
    ap.add_argument("--max-epochs", type=int, default=None, help="default: model.max_epochs")
    ap.add_argument("--context", type=int, default=96)
    ap.add_argument("--horizon", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path(".rollcast/cache"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/anomaly_bench.json"))
    args = ap.parse_args()
    settings = load_settings(env={})
    level = settings.anomalies.level
    quantiles = settings.model.quantiles
    pair = level_indices(quantiles, level)
    assert pair is not None, "the default quantiles include the anomaly level's"
    values, labels = load(args.cache)
    T = len(values)
    season = season_of(values[:TRAIN_POINTS])
    step = 1000
    data = SeriesMatrix(["InternalBleeding16"], values[None].astype(np.float32),
                        (np.arange(T, dtype=np.int64) + 1) * step, step)
    n_origins = T - args.horizon - TRAIN_POINTS + 1  # origins TRAIN_POINTS .. T - H, every point
    event = np.flatnonzero(labels)
    print(f"InternalBleeding16: {T} points, labelled anomaly at {event[0]}-{event[-1]} ({len(event)} points); "
          f"fit on the first {TRAIN_POINTS}; L={args.context}, H={args.horizon}, season {season} (autocorrelation "
          f"of the training part); flags outside the served {level:.0%} interval of the step-1 forecast")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        r = rolling_origin(name, data, n_origins=n_origins, season=season, origin_every=1,
                           config={"context": args.context, "horizon": args.horizon, "quantiles": quantiles,
                                   "season": season},
                           max_epochs=args.max_epochs or settings.model.max_epochs, train=settings.train,
                           calibration=settings.calibration)
        assert r.origins[0] == TRAIN_POINTS and r.calibrated is not None
        at = r.origins  # the point each step-1 forecast judges
        y = r.actuals[0, :, 0].astype(np.float64)
        served = r.calibrated[0, :, 0, :].astype(np.float64)
        flags = outside(served, pair, y)
        tail = tail_probability(served, quantiles, y)
        raw_flags = outside(r.forecasts[0, :, 0, :].astype(np.float64), pair, y)
        labelled = labels[at].astype(bool)
        near = (at >= event[0] - TOLERANCE) & (at <= event[-1] + TOLERANCE)
        tp = int((flags & labelled).sum())
        row = {
            "model": name, "points_judged": len(at), "flags": int(flags.sum()),
            "flag_rate_away_from_event": float(flags[~near].mean()),
            "raw_flag_rate_away_from_event": float(raw_flags[~near].mean()),
            "precision": tp / int(flags.sum()) if flags.any() else float("nan"),
            "recall": tp / int(labelled.sum()),
            "event_detected": bool(flags[near].any()),
            "flags_within_tolerance": int(flags[near].sum()),
            "top1_in_event": bool(near[int(np.argmin(tail))]),
            "lowest_tail_probability_at": int(at[int(np.argmin(tail))]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row))
    print("\n| model | points judged | flags | flag rate away from the event (nominal "
          f"{1 - level:.2f}) | raw model's | precision | recall | event detected (±{TOLERANCE}) | top-1 in event |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r_ in rows:
        print(f"| {r_['model']} | {r_['points_judged']} | {r_['flags']} | {r_['flag_rate_away_from_event']:.4f} | "
              f"{r_['raw_flag_rate_away_from_event']:.4f} | {r_['precision']:.3f} | {r_['recall']:.3f} | "
              f"{'yes' if r_['event_detected'] else 'no'} | {'yes' if r_['top1_in_event'] else 'no'} |")
    args.out.write_text(json.dumps({"level": level, "season": season, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
