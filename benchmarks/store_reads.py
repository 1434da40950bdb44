"""History store reads at job start: time and peak memory of ``last_windows`` and ``max_window_end``.

The forecast job rebuilds its context with ``HistoryStore.last_windows(L + slack)``; ingest (on every
partition assignment) and train (every cycle) call ``max_window_end()``. Both used to read the whole
store into memory; this measures them on a store of ``--days`` days of ``--series`` series at one
window per ``--step-s`` seconds, each read in a fresh process (peak RSS is per process).

    python benchmarks/store_reads.py --days 10 --series 1000 --step-s 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.store import HistoryStore, Progress  # noqa: E402
from pipeline.windows import WINDOW_SCHEMA  # noqa: E402

DAY_MS = 86_400_000
T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS

MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pipeline.store import HistoryStore
store = HistoryStore({location!r})
t = time.perf_counter()
out = store.last_windows({n}) if {what!r} == "last_windows" else store.max_window_end()
print(json.dumps({{"s": time.perf_counter() - t, "rows": len(out),
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

BASELINE = """
import json, resource, sys
sys.path.insert(0, {root!r})
from pipeline.store import HistoryStore
print(json.dumps({{"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def fill(location: str, days: int, series: int, step_ms: int) -> int:
    store = HistoryStore(location)
    names = np.array([f"s{i:05d}" for i in range(series)])
    per_day = DAY_MS // step_ms
    for d in range(days):  # one checkpoint per day, as a day of ingest would leave after compaction
        starts = T0 + d * DAY_MS + np.arange(per_day, dtype=np.int64) * step_ms
        n = per_day * series
        v = np.random.default_rng(d).normal(size=n)
        frame = pl.DataFrame({
            "series": np.repeat(names, per_day), "window_start": np.tile(starts, series),
            "window_end": np.tile(starts + step_ms, series), "count": np.full(n, 3),
            "first": v, "last": v, "min": v, "max": v, "mean": v, "sum": v,
        }).cast(WINDOW_SCHEMA)
        store.write_checkpoint("bench", 0, frame, Progress(d, None))
    return store.count()


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--step-s", type=float, default=60.0)
    ap.add_argument("--windows", type=int, default=104, help="n of last_windows (the forecast job's L + 8)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rollcast-store-") as tmp:
        location = str(Path(tmp) / "history")
        t = time.perf_counter()
        rows = fill(location, args.days, args.series, int(args.step_s * 1000))
        print(f"store: {rows:,} windows ({args.days} days x {args.series} series), "
              f"written in {time.perf_counter() - t:.1f} s", flush=True)
        base = run(BASELINE.format(root=str(ROOT)))["rss_mib"]
        print(f"a process that only imports the store: peak RSS {base:.0f} MiB")
        for what in ("last_windows", "max_window_end"):
            r = run(MEASURE.format(root=str(ROOT), location=location, n=args.windows, what=what))
            unit = "rows" if what == "last_windows" else "series"
            print(f"{what}: {r['s']:.2f} s, {r['rows']:,} {unit}, peak RSS {r['rss_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
