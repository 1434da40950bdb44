"""Ingest throughput: bare kafka-python poll loop vs. the ingest pipeline (JSON and Arrow IPC input).

    python benchmarks/ingest.py --n 400000 --series 1000 [--bootstrap host:port]

Starts its own tansu broker (jobs.stack) unless --bootstrap is given, produces
N observations over S series into fresh topics, then measures in one run:
(a) a poll loop that only counts messages, with ingest's consumer settings;
(b) the ingest pipeline (decode, validate, window, store, windows topic, commit);
(c) the same pipeline fed Arrow IPC batch messages. Ends with one summary line.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl

from jobs import stack
from pipeline.config import Settings, load_settings
from pipeline.decode import ARROW_CONTENT_TYPE
from pipeline.ingestor import Ingestor
from pipeline.kafka import ensure_topics, make_consumer, make_producer
from pipeline.windows_io import encode_windows, partition_for


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


def ingest(s: Settings, n_rows: int) -> float:
    consumer = make_consumer(s, s.groups.ingest)
    producer = make_producer(s)
    ing = Ingestor(s, consumer, producer)
    consumer.subscribe([s.topics.observations], listener=ing.listener())
    t0 = None
    while ing.rows < n_rows:
        batch = consumer.poll(timeout_ms=200)
        now = time.monotonic()
        if batch and t0 is None:
            t0 = time.perf_counter()
        for tp, recs in batch.items():
            ing.process(tp.partition, recs, now)
        ing.maybe_checkpoint(now)
    ing.checkpoint()
    dt = time.perf_counter() - t0
    consumer.close(autocommit=False)
    producer.close()
    return n_rows / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400_000, help="observations (default 400000)")
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--arrow-rows", type=int, default=50_000, help="rows per Arrow IPC message")
    ap.add_argument("--window-ms", type=int, default=60_000)
    ap.add_argument("--bootstrap", help="use this broker instead of starting tansu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="rollcast-bench-"))
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        port = stack.free_port()
        broker = stack.start_broker(stack.broker_binary(None), port, tmp / "logs")
        bootstrap = f"127.0.0.1:{port}"
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
        ensure_topics(s, [s.topics.observations, s.topics.dlq, s.topics.windows, arrow_topic])
        df = observations(args.n, args.series)
        t = time.perf_counter()
        produce_json(s, s.topics.observations, df)
        msgs = produce_arrow(s, arrow_topic, df, args.arrow_rows)
        print(f"produced {args.n} JSON observations and {msgs} Arrow messages in {time.perf_counter() - t:.1f}s")
        bare = bare_poll(s, s.topics.observations, args.n)
        print(f"(a) bare poll loop:     {bare:>12,.0f} obs/s")
        js = ingest(s, args.n)
        print(f"(b) ingest, JSON:       {js:>12,.0f} obs/s")
        s_arrow = s.replace(**{"topics.observations": arrow_topic, "groups.ingest": f"bench-arrow-{tag}",
                               "data_dir": str(tmp / "data-arrow")})
        arrow = ingest(s_arrow, args.n)
        print(f"(c) ingest, Arrow IPC:  {arrow:>12,.0f} obs/s")
        print(f"json: {js:.0f} obs/s, bare poll: {bare:.0f} obs/s, ratio: {js / bare:.2f}, arrow: {arrow:.0f} obs/s")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
