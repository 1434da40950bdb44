"""One training cycle at scale: peak RSS, cycle time and holdout MAE relative to seasonal naive.

Builds a history store of ``--series`` series x ``--windows`` hourly windows (a level, a daily and a
weekly cycle with per-series amplitudes and phases, a slow random walk and noise: learnable patterns),
written through ``HistoryStore.write_checkpoint`` in chunks of series so generation stays bounded in
memory. Starts a real local MLflow server (``jobs.processes.start_mlflow``, SQLite store), then runs
``models.train.cycle.run_cycle`` with the default settings (plus ``--set key=value`` overrides) in a child
process and reports the child's peak RSS (``ru_maxrss``), the cycle's wall time and its holdout metrics.
``--warm`` runs a full cycle, then a second cycle on the same store, which fine-tunes the champion
(``train.full_every`` permitting), and reports both. Prints one JSON line per cycle.

    PYTHONPATH=. python benchmarks/train_scale.py --series 1000
    PYTHONPATH=. python benchmarks/train_scale.py --series 1000 --warm
    PYTHONPATH=. python benchmarks/train_scale.py --series 1000 --set train.samples_per_epoch=16384
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import processes
from pipeline.store import HistoryStore, Progress

HOUR_MS = 3_600_000
T0 = 1_700_000_000_000 // (7 * 86_400_000) * (7 * 86_400_000)

CHILD = """
import json, resource, sys, time
from pipeline.config import load_settings
from pipeline.logs import setup_logging
from models.train.cycle import run_cycle
settings = load_settings(env=json.loads(sys.argv[1]))
setup_logging(settings.observability)
t = time.perf_counter()
result = run_cycle(settings)
seconds = time.perf_counter() - t
c = result.candidates[0]
print("RESULT " + json.dumps({
    "cycle_s": round(seconds, 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "series": result.span.series, "windows": result.span.windows,
    "cycle_kind": c.cycle_kind, "parent_version": c.parent_version, "version": c.version,
    "epochs": len(c.train_loss), "train_s": round(c.train_seconds, 1),
    "holdout_mae": c.mae, "seasonal_naive_mae": c.metrics["seasonal_naive_holdout_mae"],
    "rel_mae_seasonal_naive": c.metrics["holdout_rel_mae_seasonal_naive"],
    "champion_mae": c.metrics.get("champion_holdout_mae"), "decision": c.decision,
}), flush=True)
"""


def write_store(settings_env: dict[str, str], n_series: int, n_windows: int, chunk: int, seed: int) -> float:
    """Write the synthetic history in chunks of ``chunk`` series; returns the seconds it took."""
    store = HistoryStore(Path(settings_env["ROLLCAST_DATA_DIR"]) / "history")
    t0 = time.perf_counter()
    t = np.arange(n_windows)
    starts = T0 + t * HOUR_MS
    for part, a in enumerate(range(0, n_series, chunk)):
        n = min(chunk, n_series - a)
        rng = np.random.default_rng([seed, part])
        level = rng.uniform(10, 100, (n, 1))
        daily = rng.uniform(0.1, 0.3, (n, 1)) * level
        weekly = rng.uniform(0.05, 0.2, (n, 1)) * level
        phase_d, phase_w = rng.uniform(0, 24, (n, 1)), rng.uniform(0, 168, (n, 1))
        walk = np.cumsum(rng.normal(0, 0.002, (n, n_windows)), axis=1) * level
        y = (level + walk + daily * np.sin(2 * np.pi * (t + phase_d) / 24)
             + weekly * np.sin(2 * np.pi * (t + phase_w) / 168) + rng.normal(0, 0.03, (n, n_windows)) * level)
        names = np.repeat(np.array([f"s{a + i:06d}" for i in range(n)]), n_windows)
        flat = y.reshape(-1)
        windows = pl.DataFrame({
            "series": names, "window_start": np.tile(starts, n), "window_end": np.tile(starts + HOUR_MS, n),
            "count": np.ones(n * n_windows, dtype=np.int64), "first": flat, "last": flat, "min": flat,
            "max": flat, "mean": flat, "sum": flat,
        })
        store.write_checkpoint("bench", part, windows, Progress(position=windows.height, max_ts=int(starts[-1])))
        del windows, y, walk, flat, names
    return time.perf_counter() - t0


def run_child(env: dict[str, str], log: Path) -> dict:
    """Run one cycle in a fresh process (its log: ``log``); its result line as a dict."""
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(env)], stdout=subprocess.PIPE, stderr=err,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"the cycle failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{log.read_text()[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, required=True)
    parser.add_argument("--windows", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=500, help="series per generated checkpoint (memory bound)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: /tmp/rollcast-train-scale-S)")
    parser.add_argument("--reuse", action="store_true", help="keep an existing store of the same size in --dir")
    parser.add_argument("--keep", action="store_true", help="leave the store and MLflow data behind")
    parser.add_argument("--warm", action="store_true", help="a full cycle, then a warm-start cycle")
    parser.add_argument("--generate-only", action="store_true",
                        help="write the store (kept in --dir, for a later --reuse) and run no cycle")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting, e.g. train.samples_per_epoch=16384 or model.max_epochs=5")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.dir or Path(f"/tmp/rollcast-train-scale-{args.series}")
    stamp = work / f"store-{args.series}x{args.windows}-{args.seed}.ok"
    if not (args.reuse and stamp.exists()):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "mlflow", ignore_errors=True)
    shutil.rmtree(work / "data" / "models", ignore_errors=True)
    env = {
        "ROLLCAST_DATA_DIR": str(work / "data"),
        "ROLLCAST_WINDOW__LENGTH_MS": str(HOUR_MS),
        "ROLLCAST_WINDOW__TARGET": "mean",
        "ROLLCAST_MLFLOW__CONNECT_TIMEOUT_S": "60",
    }
    for item in args.set:
        key, value = item.split("=", 1)
        env["ROLLCAST_" + key.upper().replace(".", "__")] = value
    if not stamp.exists():
        gen_s = write_store(env, args.series, args.windows, args.chunk, args.seed)
        stamp.touch()
        du = subprocess.run(["du", "-sh", str(work / "data" / "history")], capture_output=True, text=True).stdout
        print(json.dumps({"generated_s": round(gen_s, 1), "store": du.split()[0] if du else "?"}), flush=True)
    if args.generate_only:
        return
    port = processes.free_port()
    server = processes.start_mlflow(work / "mlflow", port, work / "mlflow", timeout_s=180)
    try:
        env["ROLLCAST_MLFLOW__TRACKING_URI"] = f"http://127.0.0.1:{port}"
        for i in range(2 if args.warm else 1):
            out = run_child(env, work / f"cycle-{i + 1}.log")
            print(json.dumps({"cycle": i + 1, "settings": args.set, **out}), flush=True)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
