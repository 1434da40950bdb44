"""Counting the history store's windows again and again: ``count()`` against ``counter()``.

The train job with ``train.after_windows`` counts the store's windows on every poll of its schedule.
``count()`` reads the Parquet footer of every file each time (on S3, one GET per file); ``counter()``
reads each file's footer once and keeps its row count. Ingest writes a file per partition per
checkpoint that closes windows, so the number of files is what the cost follows. This writes
``--files`` checkpoints of a few windows each into a local store, then times one ``count()``, the
first ``counter()`` call and the second.

    python benchmarks/store_counts.py --files 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.store import HistoryStore, Progress  # noqa: E402
from pipeline.windows import WINDOW_SCHEMA  # noqa: E402

T0 = 1_700_000_000_000
STEP = 60_000


def windows(index: int, series: int) -> pl.DataFrame:
    start = T0 + index * STEP
    return pl.DataFrame(
        [(f"s{i}", start, start + STEP, 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0) for i in range(series)],
        schema=WINDOW_SCHEMA, orient="row",
    )


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn()
    return (time.perf_counter() - t) * 1000, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000, help="checkpoints written, one file each")
    ap.add_argument("--series", type=int, default=3, help="windows per checkpoint")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rollcast-counts-") as root:
        store = HistoryStore(root)
        for i in range(args.files):
            store.write_checkpoint("obs", i % 4, windows(i, args.series), Progress(i + 1, None))
        count = store.counter()
        rows = [("count()", *timed(store.count)), ("counter(), first call", *timed(count)),
                ("counter(), again", *timed(count))]
    print(f"{args.files} files, {args.files * args.series} windows, a local store\n")
    print("| call | ms | windows counted |\n|---|---|---|")
    for name, ms, n in rows:
        print(f"| {name} | {ms:.1f} | {n} |")


if __name__ == "__main__":
    main()
