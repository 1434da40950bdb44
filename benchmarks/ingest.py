"""Ingest throughput: bare kafka-python poll loop vs. the ingest pipeline (JSON and Arrow IPC input).

    python benchmarks/ingest.py --n 400000 --arrow-n 4000000 --series 1000 --repeat 3 [--bootstrap host:port]

Starts its own tansu broker (pipeline.processes) unless --bootstrap is given, produces
N JSON observations and ARROW_N observations in Arrow IPC messages (ARROW_ROWS
rows each) over S series into fresh topics, then measures in one run:
(a) a poll loop that only counts messages, with ingest's consumer settings;
(b) the ingest job's own session loop (poll, decode, validate, window, store, windows topic, commit);
(c) the same pipeline fed Arrow IPC batch messages.
(a) and (b) alternate REPEAT times (each ingest run from a fresh consumer group,
fresh history store and fresh windows topic), so each (b)/(a) ratio compares runs
taken seconds apart on a shared machine; the summary line gives the median.
Every ingest run ends with a final checkpoint (store write, produce, commit)
inside the timed span. kafka-python verifies the CRC32C of every record batch,
in pure Python unless the ``crc32c`` package is importable; the output says which.
The process runs with the GIL switch interval ``rollcast ingest`` sets
(:data:`pipeline.ingest.ingestor.GIL_SWITCH_INTERVAL_S`, 0.5 ms), for both loops alike;
``--switch-interval-ms 5`` measures with CPython's default instead.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import processes
from pipeline.config import Settings, load_settings
from pipeline.ingest.ingestor import GIL_SWITCH_INTERVAL_S
from pipeline.ingest.session import Totals, consume_session
from pipeline.kafka.clients import ensure_topics, make_consumer, make_producer
from pipeline.kafka.headers import ARROW_CONTENT_TYPE
from pipeline.kafka.partitioning import partition_for
from pipeline.store import HistoryStore
from pipeline.windows_io import encode_windows


def observations(n: int, series: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ts = 1_700_000_000_000 + np.arange(n, dtype=np.int64) * 10
    return pl.DataFrame({
        "series": [f"s{i}" for i in rng.integers(0, series, n)],
        "ts": ts,
        "value": rng.normal(100, 5, n).round(4),
    })


def produce_json(s: Settings, topic: str, df: pl.DataFrame) -> None:
    producer = make_producer(s)
    lines = df.write_ndjson().encode().splitlines()
    for key, value in zip(df["series"].to_list(), lines, strict=True):
        producer.send(topic, value, key=key.encode())
    producer.flush()
    producer.close()


def produce_arrow(s: Settings, topic: str, df: pl.DataFrame, rows: int) -> int:
    """Arrow IPC messages, each holding series of one partition (sent to that partition)."""
    producer = make_producer(s)
    parts = pl.DataFrame({"series": df["series"].unique()}).with_columns(
        _p=pl.col("series").map_elements(lambda x: partition_for(x, s.kafka.partitions), return_dtype=pl.Int64)
    )
    routed = df.join(parts, on="series", maintain_order="left")
    sent = 0
    for (p,), group in routed.group_by("_p", maintain_order=True):
        group = group.drop("_p")
        for start in range(0, group.height, rows):
            producer.send(topic, encode_windows(group.slice(start, rows)), partition=int(p),
                          headers=[("content-type", ARROW_CONTENT_TYPE.encode())])
            sent += 1
    producer.flush()
    producer.close()
    return sent


def bare_poll(s: Settings, topic: str, n: int) -> float:
    consumer = make_consumer(s, f"bare-{uuid.uuid4().hex[:6]}", topic)
    count = 0
    t0 = None
    while count < n:
        for recs in consumer.poll(timeout_ms=200).values():
            if t0 is None:
                t0 = time.perf_counter()
            count += len(recs)
    dt = time.perf_counter() - t0
    consumer.close()
    return n / dt


def crc_impl() -> str:
    from kafka.record import util

    return "C (crc32c package)" if getattr(util, "crc32c_c", None) is not None else "pure Python"


def ingest(s: Settings, n_messages: int, n_rows: int) -> float:
    """The session ``rollcast ingest`` runs (:func:`pipeline.ingest.session.consume_session`) until all
    ``n_messages`` are polled, then its final checkpoint; observations per second from the first poll
    that returned records."""
    polled, t0 = [0], [None]

    def on_poll(batch: dict, _ingestor: object) -> None:
        if batch and t0[0] is None:
            t0[0] = time.perf_counter()
        polled[0] += sum(len(recs) for recs in batch.values())

    totals = Totals()
    consume_session(s, threading.Event(), totals, on_poll=on_poll, until=lambda _ing: polled[0] >= n_messages)
    dt = time.perf_counter() - t0[0]
    stored = HistoryStore(s).count()
    if totals.rows != n_rows or stored == 0:
        raise RuntimeError(f"ingest saw {totals.rows} of {n_rows} observations, stored {stored} windows")
    return n_rows / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400_000, help="JSON observations (default 400000)")
    ap.add_argument("--arrow-n", type=int, default=4_000_000, help="observations in Arrow messages (default 4000000)")
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--arrow-rows", type=int, default=100_000, help="rows per Arrow IPC message (default 100000)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating (a)/(b) pairs (default 3)")
    ap.add_argument("--window-ms", type=int, default=60_000)
    ap.add_argument("--bootstrap", help="use this broker instead of starting tansu")
    ap.add_argument("--switch-interval-ms", type=float, default=GIL_SWITCH_INTERVAL_S * 1000,
                    help="GIL switch interval for the whole process (default: what rollcast ingest sets, "
                         f"{GIL_SWITCH_INTERVAL_S * 1000:g}; CPython's default is 5)")
    args = ap.parse_args()
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="rollcast-bench-"))
    bootstrap, broker = processes.broker_unless_given(args.bootstrap, tmp / "logs")
    try:
        tag = uuid.uuid4().hex[:6]
        env = {
            "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "ROLLCAST_KAFKA__PARTITIONS": str(args.partitions),
            "ROLLCAST_DATA_DIR": str(tmp / "data"), "ROLLCAST_WINDOW__LENGTH_MS": str(args.window_ms),
            "ROLLCAST_WINDOW__IDLE_TIMEOUT_S": "3600", "ROLLCAST_TOPICS__OBSERVATIONS": f"bench-obs-{tag}",
            "ROLLCAST_TOPICS__DLQ": f"bench-dlq-{tag}", "ROLLCAST_TOPICS__WINDOWS": f"bench-win-{tag}",
            "ROLLCAST_GROUPS__INGEST": f"bench-ingest-{tag}",
        }
        s = load_settings(env=env)
        arrow_topic = f"bench-arrow-{tag}"
        ensure_topics(s, [s.topics.observations, s.topics.dlq, arrow_topic])
        print(f"kafka-python CRC32C: {crc_impl()}; GIL switch interval: {sys.getswitchinterval() * 1000:g} ms (both loops)")
        df = observations(args.n, args.series)
        t = time.perf_counter()
        produce_json(s, s.topics.observations, df)
        arrow_df = observations(args.arrow_n, args.series, seed=1)
        msgs = produce_arrow(s, arrow_topic, arrow_df, args.arrow_rows)
        del arrow_df
        print(f"produced {args.n} JSON observations and {args.arrow_n} in {msgs} Arrow messages "
              f"in {time.perf_counter() - t:.1f}s")
        ratios: list[float] = []
        for i in range(args.repeat):
            bare = bare_poll(s, s.topics.observations, args.n)
            run = s.replace(**{"topics.windows": f"bench-win-{tag}-{i}", "groups.ingest": f"bench-ingest-{tag}-{i}",
                               "data_dir": str(tmp / f"data-{i}")})
            ensure_topics(run, [run.topics.windows])
            js = ingest(run, args.n, args.n)
            ratios.append(js / bare)
            print(f"(a) bare poll loop:     {bare:>12,.0f} obs/s")
            print(f"(b) ingest, JSON:       {js:>12,.0f} obs/s   ratio {js / bare:.2f}")
        s_arrow = s.replace(**{"topics.observations": arrow_topic, "groups.ingest": f"bench-arrow-{tag}",
                               "topics.windows": f"bench-win-{tag}-arrow", "data_dir": str(tmp / "data-arrow")})
        ensure_topics(s_arrow, [s_arrow.topics.windows])
        arrow = ingest(s_arrow, msgs, args.arrow_n)
        print(f"(c) ingest, Arrow IPC:  {arrow:>12,.0f} obs/s")
        med = statistics.median(ratios)
        print(f"json: {js:.0f} obs/s, bare poll: {bare:.0f} obs/s, ratio: {med:.2f} "
              f"(median of {', '.join(f'{r:.2f}' for r in ratios)}), arrow: {arrow:.0f} obs/s, crc32c: {crc_impl()}")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
