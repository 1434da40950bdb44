"""One ingest partition assignment on a big history store: ``Ingestor.assign`` timed, fresh Ingestor each round.

When ``rollcast ingest`` is assigned partitions, ``Ingestor.assign`` recovers each partition's progress
record and builds its window state from the history store (at 034b549 ``HistoryStore.max_window_end()``,
which reads ``series, window_end`` of every Parquet file of the store). On a big store an assignment can
outlast the consumer group's session timeout. This times that assignment.

The store: ``--series`` series x ``--windows`` windows of ``--window-ms`` (default: the settings' default
window length, an hour), in the store's layout (``pipeline/store.py``): Parquet files with the schema
``WINDOW_SCHEMA`` (the Arrow types a checkpoint writes) under ``day=YYYY-MM-DD/``, named
``<checkpoint-id>-<topic>-<partition>.parquet``, each sorted by (series, window_start): one file per source
partition per ``--file-ms`` of event time (an hour: what ingest's checkpoints write as the windows close),
series spread over ``--source-partitions`` partitions by a hash of the name. Values: a per-series level
and daily cycle plus noise, kept to two decimals (sensor readings). Every source partition gets a
progress record (``HistoryStore.write_checkpoint`` of no windows, position and safe offset 1,000,000,
max_ts the end of the last window), so an assignment finds a checkpoint for each partition. The store is
built file by file with pyarrow in a child process (memory follows one file; the peak RSS printed is the
assignment's). ``--store DIR`` keeps it for later runs: ``DIR/_benchmark_assign.json`` says what it
holds, and a run asking for the same store reuses it; without ``--store`` a temporary store is built
and removed.

The consumer and producer are scripted stand-ins, because an assignment reads the store, not Kafka:
the consumer's ``seek`` only records the offset, the producer is only stored (``windows_partitions`` is
given, so ``partitions_for`` is not asked). Each round builds a fresh ``Ingestor`` (its own
``HistoryStore``) and times ``assign(--partitions)``. Prints each round's seconds and the median, the
peak RSS, the store's rows, files and bytes, and the commit of the ``pipeline`` package imported (so a
worktree of an older commit on ``PYTHONPATH`` is named).

    PYTHONPATH=. python benchmarks/assign.py --series 10000 --windows 5000
    PYTHONPATH=. python benchmarks/assign.py --store /tmp/bigstore

Before/after on one store (the "before" from a worktree, so that uncommitted edits do not count)::

    git worktree add /tmp/before-assign 034b549
    cd /tmp/before-assign && PYTHONPATH=/tmp/before-assign python /work/main/benchmarks/assign.py --store /tmp/bigstore
    cd /work/main && PYTHONPATH=. python benchmarks/assign.py --store /tmp/bigstore
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# A fallback only: the pipeline package on PYTHONPATH (e.g. a worktree of another commit) or installed wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.store import HistoryStore, Progress  # noqa: E402

DAY_MS = 86_400_000
T0 = 1_700_000_000_000 // DAY_MS * DAY_MS  # 2023-11-14T00:00Z
POSITION = 1_000_000  # the progress records' position and safe offset
MARKER = "_benchmark_assign.json"
BUILDING = "_benchmark_assign.building"
SPEC = ("series", "windows", "window_ms", "file_ms", "source_partitions", "seed", "topic", "t0")


def _arrow_schema() -> pa.Schema:
    """The Arrow schema of a checkpoint's files (polars' ``WINDOW_SCHEMA`` frame ``.to_arrow()``)."""
    import polars as pl

    from pipeline.windows import WINDOW_SCHEMA

    return pl.DataFrame(schema=WINDOW_SCHEMA).to_arrow().schema


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms // 1000))


def build(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Write the store's files and progress records; return the marker (spec plus what was written)."""
    import polars as pl

    from pipeline.windows import WINDOW_SCHEMA

    t = time.perf_counter()
    n, n_win, length, file_ms, parts = (spec[k] for k in ("series", "windows", "window_ms", "file_ms",
                                                            "source_partitions"))
    schema = _arrow_schema()
    rng = np.random.default_rng(spec["seed"])
    names = [f"s{i:0{len(str(n - 1))}d}" for i in range(n)]
    owner = np.array([zlib.crc32(s.encode()) % parts for s in names])
    level = rng.uniform(10.0, 100.0, n)
    amp = rng.uniform(0.0, 0.3, n) * level
    phase = rng.uniform(0.0, 2 * np.pi, n)
    # window w starts at T0 + w * length; a file holds the windows starting in one --file-ms period of one day
    starts = T0 + np.arange(n_win, dtype=np.int64) * length
    key = (starts // DAY_MS) * (DAY_MS // file_ms + 2) + (starts % DAY_MS) // file_ms
    cuts = np.flatnonzero(np.diff(key)) + 1
    chunks = np.split(np.arange(n_win), cuts)
    rows = files = size = 0
    days: set[str] = set()
    for p in range(parts):
        mine = np.flatnonzero(owner == p)  # names are zero-padded: index order is name order
        if not len(mine):
            continue
        dictionary = pa.array([names[i] for i in mine], type=schema.field("series").type)
        for chunk in chunks:
            k = len(chunk)
            s_local = np.repeat(np.arange(len(mine), dtype=np.int64), k)  # sorted by (series, window_start)
            s = mine[s_local]
            ws = np.tile(starts[chunk], len(mine))
            cycle = np.sin(2 * np.pi * (ws % DAY_MS) / DAY_MS + phase[s])
            m = len(ws)
            mean = np.round(level[s] + amp[s] * cycle + rng.standard_normal(m), 2)
            noise = rng.standard_normal((2, m))
            first, last = np.round(mean + noise[0], 2), np.round(mean + noise[1], 2)
            spread = np.round(np.abs(rng.standard_normal((2, m))), 2)
            count = rng.integers(1, 61, m)
            cols = {
                "series": dictionary.take(pa.array(s_local)),
                "window_start": ws,
                "window_end": ws + length,
                "count": count,
                "first": first,
                "last": last,
                "min": np.round(np.minimum(np.minimum(first, last), mean) - spread[0], 2),
                "max": np.round(np.maximum(np.maximum(first, last), mean) + spread[1], 2),
                "mean": mean,
                "sum": np.round(mean * count, 2),
            }
            table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) if not isinstance(cols[f.name], pa.Array)
                                          else cols[f.name] for f in schema], schema=schema)
            first_start = int(starts[chunk[0]])
            written_ns = (int(starts[chunk[-1]]) + length) * 1_000_000  # when ingest closed the last of them
            ckpt = f"{written_ns:020d}-{zlib.crc32(f'{p}-{first_start}'.encode()):08x}"
            day = root / f"day={_day(first_start)}"
            day.mkdir(exist_ok=True)
            path = day / f"{ckpt}-{spec['topic']}-{p}.parquet"
            pq.write_table(table, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
            rows += m
            files += 1
            size += path.stat().st_size
            days.add(day.name)
    last_end = int(starts[-1]) + length
    store = HistoryStore(str(root))
    empty = pl.DataFrame(schema=WINDOW_SCHEMA)
    for p in range(parts):
        store.write_checkpoint(spec["topic"], p, empty, Progress(POSITION, last_end, POSITION))
    return {**spec, "rows": rows, "files": files, "day_dirs": len(days), "bytes": size, "last_end": last_end,
            "build_s": round(time.perf_counter() - t, 1), "built_with": pipeline_commit()}


def pipeline_commit() -> str:
    """The commit of the imported ``pipeline`` package's checkout, and whether it has uncommitted edits."""
    where = os.path.dirname(os.path.abspath(pipeline.__file__))
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{where} (not a git checkout)"
    return f"{head}{' + uncommitted edits in ' + where if dirty else ''} ({where})"


class StandInConsumer:
    """What ``Ingestor.assign`` asks of a consumer: ``seek`` (recorded, nothing read)."""

    def __init__(self) -> None:
        self.seeks: dict[Any, int] = {}

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks[tp] = offset


class StandInProducer:
    """Only stored by ``Ingestor`` (DeadLetters, Checkpoint); nothing is sent during an assignment."""

    def partitions_for(self, topic: str) -> set[int]:
        return set(range(4))


def ensure_store(args: argparse.Namespace, root: Path, spec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The store's marker, building the store (in a child process) unless ``root`` holds it already."""
    marker = root / MARKER
    if marker.exists():
        held = json.loads(marker.read_text())
        if {k: held.get(k) for k in SPEC} == spec:
            return held, False
        sys.exit(f"{root} holds another store ({ {k: held.get(k) for k in SPEC} }); remove it or pick another --store")
    if root.exists() and any(root.iterdir()):
        if not (root / BUILDING).exists():
            sys.exit(f"{root} is not empty and was not built by this script; remove it or pick another --store")
        shutil.rmtree(root)  # an interrupted build of this script
    root.mkdir(parents=True, exist_ok=True)
    (root / BUILDING).write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--build-only", "--store", str(root), "--series", str(args.series),
           "--windows", str(args.windows), "--window-ms", str(args.window_ms), "--file-ms", str(args.file_ms),
           "--source-partitions", str(args.source_partitions), "--seed", str(args.seed)]
    subprocess.run(cmd, check=True)
    return json.loads(marker.read_text()), True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=100_000)
    ap.add_argument("--windows", type=int, default=5_000, help="windows per series")
    ap.add_argument("--window-ms", type=int, default=3_600_000,
                    help="window length (default: window.length_ms's default)")
    ap.add_argument("--file-ms", type=int, default=3_600_000,
                    help="event time per file (one file per source partition per period); divides a day")
    ap.add_argument("--source-partitions", type=int, default=4, help="partitions of the observations topic")
    ap.add_argument("--partitions", type=int, nargs="+", default=[0, 1], help="the partitions assigned")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", type=Path, help="build the store here, or reuse the one this script built here")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # the child that builds
    args = ap.parse_args()
    if DAY_MS % args.file_ms:
        ap.error("--file-ms must divide a day")
    env = {"ROLLCAST_WINDOW__LENGTH_MS": str(args.window_ms)}
    topic = load_settings(env=env).topics.observations
    spec = {"series": args.series, "windows": args.windows, "window_ms": args.window_ms, "file_ms": args.file_ms,
            "source_partitions": args.source_partitions, "seed": args.seed, "topic": topic, "t0": T0}

    if args.build_only:
        held = build(args.store, spec)
        (args.store / MARKER).write_text(json.dumps(held, indent=1) + "\n")
        (args.store / BUILDING).unlink()
        return

    tmp = None if args.store else tempfile.mkdtemp(prefix="rollcast-assign-")
    root = (args.store or Path(tmp)).resolve()
    data_dir = tempfile.mkdtemp(prefix="rollcast-assign-data-")  # settings.data_dir: nothing is written there
    try:
        held, built = ensure_store(args, root, spec)
        build_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        settings = load_settings(env={**env, "ROLLCAST_STORAGE__HISTORY": str(root),
                                      "ROLLCAST_DATA_DIR": data_dir})
        from pipeline.ingest.ingestor import Ingestor

        print(f"pipeline: {pipeline_commit()}")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
        print(f"store: {root}: {held['series']} series x {held['windows']} windows of {held['window_ms']} ms, "
              f"{held['rows']} rows, {held['files']} files in {held['day_dirs']} day directories, "
              f"{held['bytes'] / 2**30:.2f} GiB")
        if built:
            print(f"built now in {held['build_s']} s (child peak RSS {build_rss:.0f} MiB)")
        else:
            print(f"reused (built in {held['build_s']} s with {held['built_with']})")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        seconds = []
        for r in range(args.rounds):
            gc.collect()
            consumer = StandInConsumer()
            ingestor = Ingestor(settings, consumer, StandInProducer(), store=HistoryStore(str(root)),
                                windows_partitions=4)
            t = time.perf_counter()
            ingestor.assign(args.partitions)
            seconds.append(time.perf_counter() - t)
            runs = getattr(ingestor, "runs", {})
            known = [len(getattr(getattr(runs.get(p), "state", None), "closed_until", None) or {})
                     for p in args.partitions]
            ingestor.close()
            print(f"round {r + 1}: assign({args.partitions}) {seconds[-1]:.2f} s "
                  f"(series with a closed_until per partition: {known}, seeks: {sorted(consumer.seeks.values())})")
            del ingestor, runs
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"median: {statistics.median(seconds):.2f} s over {len(seconds)} rounds")
        print(f"peak RSS: {rss:.0f} MiB (before the first assignment: {rss_before:.0f} MiB)")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
