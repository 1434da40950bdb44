"""The train cycle's span read: ``models.data.read_matrix`` in one pass on the window grid (``step_ms``, what
the cycle does) against the general two-pass read (grid found from the data), on an existing history store.

Reads the last ``--windows`` windows of every series, ``--rounds`` times each, alternating the two, in
this process, and prints one JSON line: seconds per read (every round, and the median), the ratio of the
medians and the rows read. Both reads give the same matrix (checked). A store to read:
``benchmarks/train_scale.py --series S --generate-only`` (kept under /tmp/rollcast-train-scale-S).

    PYTHONPATH=. python benchmarks/read_span.py /tmp/rollcast-train-scale-1000/data/history
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from models.data import read_matrix
from pipeline.store import HistoryStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--windows", type=int, default=5000)
    ap.add_argument("--step-ms", type=int, default=3_600_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    store = HistoryStore(args.store)
    t = time.perf_counter()
    end = store.last_window_end()
    end_s = time.perf_counter() - t
    assert end is not None, "the store is empty"
    start = end - args.windows * args.step_ms
    one, two, rows = [], [], 0
    for r in range(args.rounds):
        t = time.perf_counter()
        a, rows, _ = read_matrix(store, start, end, "mean", step_ms=args.step_ms)
        one.append(time.perf_counter() - t)
        if r == 0:
            check = (a.series[:: max(1, len(a.series) // 100)], a.values[:: max(1, len(a.series) // 100)].copy())
        del a
        t = time.perf_counter()
        b, rows_b, _ = read_matrix(store, start, end, "mean")
        two.append(time.perf_counter() - t)
        if r == 0:
            assert rows_b == rows and b.series[:: max(1, len(b.series) // 100)] == check[0]
            np.testing.assert_array_equal(b.values[:: max(1, len(b.series) // 100)], check[1])
        del b
    print(json.dumps({
        "store": str(args.store), "rows": rows, "last_window_end_s": round(end_s, 3),
        "one_pass_s": [round(x, 2) for x in one], "two_pass_s": [round(x, 2) for x in two],
        "median_one_pass_s": round(statistics.median(one), 2), "median_two_pass_s": round(statistics.median(two), 2),
        "two_over_one": round(statistics.median(two) / statistics.median(one), 2),
    }))


if __name__ == "__main__":
    main()
