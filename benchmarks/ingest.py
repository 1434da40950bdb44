"""Ingest throughput: bare kafka-python poll loop vs. the ingest pipeline (JSON and Arrow IPC input).

    python benchmarks/ingest.py --n 400000 --arrow-n 4000000 --series 1000 --repeat 3 [--bootstrap host:port]
    python benchmarks/ingest.py --window-ms 1000 --series 100      # short windows over few series

Starts its own tansu broker (pipeline.processes) unless --bootstrap is given, produces
N JSON observations (10 ms apart) and ARROW_N observations in Arrow IPC messages (ARROW_ROWS
rows each) over S series into fresh topics, then measures in one run:
(a) a poll loop that only counts messages, with ingest's consumer settings;
(b) the ingest job's own session loop, in this process (poll, decode, validate, window, store,
    windows topic, commit);
(s) ``rollcast ingest`` as users run it, a process of its own (``python -m jobs.cli ingest``, the
    same settings as ``ROLLCAST_*`` variables), timed from outside by its
    ``rollcast_ingest_observations_total`` counter, scraped from its ``/metrics`` every 100 ms: from the
    first scrape that finds the counter above zero to the first that finds all N, the observations
    counted in between over that time. Start-up (imports, joining the group, claiming the
    partitions) is before the first count and left out; so is the final checkpoint at SIGTERM, after
    the last count (the process must still exit 0 with windows in the store);
(c) the session loop of (b) fed Arrow IPC batch messages (``--arrow-n 0`` leaves it out).
(a), (b) and (s) alternate REPEAT times (each ingest run from a fresh consumer group,
fresh history store and fresh windows topic), so each ratio to (a) compares runs
taken seconds apart on a shared machine; the summary line gives the medians.
(b) ends with a final checkpoint (store write, produce, commit) inside its timed span.
kafka-python verifies the CRC32C of every record batch, in pure Python unless the ``crc32c``
package is importable; the output says which. This process runs with the GIL switch interval
``rollcast ingest`` sets (:data:`pipeline.ingest.ingestor.GIL_SWITCH_INTERVAL_S`, 0.5 ms), for
(a) and (b) alike; ``--switch-interval-ms 5`` measures them with CPython's default instead ((s) sets
its own). ``--py-spy DIR`` records each (s) run with py-spy (``--nonblocking``, all threads, collapsed
stacks in DIR): a profile of the job as it runs, but its figures are then not comparable.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import processes
from pipeline.config import Settings, load_settings
from pipeline.ingest.ingestor import GIL_SWITCH_INTERVAL_S
from pipeline.ingest.session import Totals, consume_session
from pipeline.kafka.clients import consumer_kwargs, ensure_topics, make_producer
from pipeline.kafka.headers import ARROW_CONTENT_TYPE
from pipeline.kafka.partitioning import partition_for
from pipeline.store import HistoryStore
from pipeline.windows_io import encode_windows

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_S = 0.1
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
OBSERVED = re.compile(r"^rollcast_ingest_observations_total\{[^}]*\} (\S+)$", re.M)


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


# (a): kafka-python alone, in a process that imports nothing of rollcast (whose fetch-path changes,
# pipeline.kafka.clients, apply to every consumer of a process that imports it)
BARE_POLL = """
import json, sys, time
from kafka import KafkaConsumer
kwargs, topic, n, switch = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
sys.setswitchinterval(switch)
consumer = KafkaConsumer(topic, **kwargs)
count, t0 = 0, None
while count < n:
    for recs in consumer.poll(timeout_ms=200).values():
        if t0 is None:
            t0, cpu0 = time.perf_counter(), time.process_time()
        count += len(recs)
print(n / (time.perf_counter() - t0), time.process_time() - cpu0)
consumer.close()
"""


def bare_poll(s: Settings, topic: str, n: int) -> tuple[float, float]:
    """(a) in a process of its own: observations per second and the process's CPU microseconds per
    observation, from the first poll that returned records until ``n`` were polled."""
    kwargs = consumer_kwargs(s, f"bare-{uuid.uuid4().hex[:6]}")
    kwargs["bootstrap_timeout_ms"] = int(s.kafka.connect_timeout_s * 1000)
    out = subprocess.run([sys.executable, "-c", BARE_POLL, json.dumps(kwargs), topic, str(n),
                          str(sys.getswitchinterval())], capture_output=True, text=True, check=True, timeout=600)
    rate, cpu = out.stdout.split()
    return float(rate), float(cpu) / n * 1e6


def crc_impl() -> str:
    from kafka.record import util

    return "C (crc32c package)" if getattr(util, "crc32c_c", None) is not None else "pure Python"


def ingest(s: Settings, n_messages: int, n_rows: int) -> tuple[float, float]:
    """The session ``rollcast ingest`` runs (:func:`pipeline.ingest.session.consume_session`) until all
    ``n_messages`` are polled, then its final checkpoint; observations per second and this process's CPU
    microseconds per observation, from the first poll that returned records."""
    polled, t0 = [0], [None]

    def on_poll(batch: dict, _ingestor: object) -> None:
        if batch and t0[0] is None:
            t0[0] = (time.perf_counter(), time.process_time())
        polled[0] += sum(len(recs) for recs in batch.values())

    totals = Totals()
    consume_session(s, threading.Event(), totals, on_poll=on_poll, until=lambda _ing: polled[0] >= n_messages)
    dt, cpu = time.perf_counter() - t0[0][0], time.process_time() - t0[0][1]
    stored = HistoryStore(s).count()
    if totals.rows != n_rows or stored == 0:
        raise RuntimeError(f"ingest saw {totals.rows} of {n_rows} observations, stored {stored} windows")
    return n_rows / dt, cpu / n_rows * 1e6


def observed(port: int) -> float | None:
    """The job's ``rollcast_ingest_observations_total`` (all formats); None while it does not answer."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return sum(float(v) for v in OBSERVED.findall(text))


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ingest_process(s: Settings, env: dict[str, str], n_rows: int, log_path: Path,
                   py_spy: list[str] | None = None) -> tuple[float, float]:
    """``rollcast ingest`` in a process of its own with the settings ``env``; observations per second as its
    counter shows them from outside (see the module docstring for the span), and its CPU microseconds per
    observation over the span. ``py_spy``: a ``py-spy record`` command line (without ``--pid``) run over
    the span."""
    port = processes.free_port()
    env = {**os.environ, **env, "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(port),
           "ROLLCAST_OBSERVABILITY__LOG_LEVEL": "WARNING"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "ingest"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        spy = None
        try:
            first = None
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"rollcast ingest exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollcast ingest did not count {n_rows} observations; see {log_path}")
                count = observed(port)
                now, cpu = time.perf_counter(), cpu_seconds(proc.pid)
                if count:
                    if first is None:
                        first = (now, count, cpu)
                        if py_spy is not None:
                            spy = subprocess.Popen([*py_spy, "--pid", str(proc.pid)], stdout=subprocess.DEVNULL,
                                                   stderr=log)
                    if count >= n_rows:
                        break
                time.sleep(SCRAPE_S)
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
                spy.wait(60)
            proc.send_signal(signal.SIGTERM)  # a final checkpoint, then exit 0
            code = proc.wait(120)
    t0, c0, cpu0 = first
    if code != 0 or HistoryStore(s).count() == 0 or c0 >= n_rows:
        raise RuntimeError(f"rollcast ingest exited {code}, counted {c0} at its first scrape; see {log_path}")
    return (n_rows - c0) / (now - t0), (cpu - cpu0) / (n_rows - c0) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400_000, help="JSON observations (default 400000)")
    ap.add_argument("--arrow-n", type=int, default=4_000_000, help="observations in Arrow messages (default 4000000; 0: no (c))")
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--arrow-rows", type=int, default=100_000, help="rows per Arrow IPC message (default 100000)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating (a), (b), (s) rounds (default 3)")
    ap.add_argument("--window-ms", type=int, default=60_000)
    ap.add_argument("--bootstrap", help="use this broker instead of starting tansu")
    ap.add_argument("--switch-interval-ms", type=float, default=GIL_SWITCH_INTERVAL_S * 1000,
                    help="GIL switch interval for the whole process (default: what rollcast ingest sets, "
                         f"{GIL_SWITCH_INTERVAL_S * 1000:g}; CPython's default is 5)")
    ap.add_argument("--py-spy", type=Path, metavar="DIR", help="record every (s) run with py-spy into DIR")
    ap.add_argument("--py-spy-gil", action="store_true", help="with --py-spy: sample only the thread holding the GIL")
    args = ap.parse_args()
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
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
        print(f"kafka-python CRC32C: {crc_impl()}; GIL switch interval: {sys.getswitchinterval() * 1000:g} ms ((a), (b))")
        df = observations(args.n, args.series)
        t = time.perf_counter()
        produce_json(s, s.topics.observations, df)
        msgs = 0
        if args.arrow_n:
            arrow_df = observations(args.arrow_n, args.series, seed=1)
            msgs = produce_arrow(s, arrow_topic, arrow_df, args.arrow_rows)
            del arrow_df
        print(f"produced {args.n} JSON observations and {args.arrow_n} in {msgs} Arrow messages "
              f"in {time.perf_counter() - t:.1f}s")
        bares: list[float] = []
        inproc: list[float] = []
        procs: list[float] = []
        for i in range(args.repeat):
            bare, cpu = bare_poll(s, s.topics.observations, args.n)
            bares.append(bare)
            print(f"(a) bare poll loop:     {bare:>12,.0f} obs/s              {cpu:5.1f} us CPU/obs")
            run_env = {**env, "ROLLCAST_TOPICS__WINDOWS": f"bench-win-{tag}-{i}",
                       "ROLLCAST_GROUPS__INGEST": f"bench-ingest-{tag}-{i}", "ROLLCAST_DATA_DIR": str(tmp / f"data-{i}")}
            run = load_settings(env=run_env)
            ensure_topics(run, [run.topics.windows])
            js, cpu = ingest(run, args.n, args.n)
            inproc.append(js)
            print(f"(b) ingest, JSON:       {js:>12,.0f} obs/s   ratio {js / bare:.2f}   {cpu:5.1f} us CPU/obs")
            run_env = {**run_env, "ROLLCAST_TOPICS__WINDOWS": f"bench-win-{tag}-{i}-s",
                       "ROLLCAST_GROUPS__INGEST": f"bench-ingest-{tag}-{i}-s",
                       "ROLLCAST_DATA_DIR": str(tmp / f"data-{i}-s")}
            run = load_settings(env=run_env)
            ensure_topics(run, [run.topics.windows])
            spy = None
            if args.py_spy is not None:
                spy = [PY_SPY, "record", "--nonblocking", "--rate", "200", "--format", "raw", "--threads",
                       *(["--gil"] if args.py_spy_gil else []), "-o", str(args.py_spy / f"ingest-{i}.txt")]
            sp, cpu = ingest_process(run, run_env, args.n, tmp / f"ingest-{i}.log", spy)
            procs.append(sp)
            print(f"(s) rollcast ingest:    {sp:>12,.0f} obs/s   ratio {sp / bare:.2f}   {cpu:5.1f} us CPU/obs",
                  flush=True)
        arrow = None
        if args.arrow_n:
            s_arrow = s.replace(**{"topics.observations": arrow_topic, "groups.ingest": f"bench-arrow-{tag}",
                                   "topics.windows": f"bench-win-{tag}-arrow", "data_dir": str(tmp / "data-arrow")})
            ensure_topics(s_arrow, [s_arrow.topics.windows])
            arrow, _ = ingest(s_arrow, msgs, args.arrow_n)
            print(f"(c) ingest, Arrow IPC:  {arrow:>12,.0f} obs/s")

        def ratios(of: list[float]) -> str:
            r = [x / b for x, b in zip(of, bares, strict=True)]
            return f"{statistics.median(r):.2f} (median of {', '.join(f'{x:.2f}' for x in r)})"

        print(f"window {args.window_ms} ms, {args.series} series, {args.n} JSON observations; medians: "
              f"bare poll {statistics.median(bares):.0f} obs/s; in-process json {statistics.median(inproc):.0f} obs/s, "
              f"ratio {ratios(inproc)}; rollcast ingest {statistics.median(procs):.0f} obs/s, ratio {ratios(procs)}; "
              + (f"arrow: {arrow:.0f} obs/s; " if arrow is not None else "") + f"crc32c: {crc_impl()}")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
