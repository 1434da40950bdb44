"""Forecast latency: from a window batch produced to `windows` until all its forecasts are readable.

For each model type and series count it starts a real tansu broker (unless
--bootstrap is given), seeds the history store with L windows per series,
starts `rollcast forecast --model-dir` (a saved, untrained model of that type:
latency does not depend on the weights) as a subprocess, then repeatedly
produces the next window of every series as Arrow IPC messages (as ingest
does) and times until a consumer has read one forecast per series for that
window. It prints p50/p99 of that end-to-end latency and the share of it spent
in the job's batched inference (from the job's Prometheus histogram), the job's
time by stage, and every round over 100 ms with the job's stages that took over
100 ms in that run (from the stage histograms' buckets; none means the time went
outside the job's stages).

The windows of a round are produced as ingest's checkpoint produces them
(``WindowRouter.batch``: one message per partition, with the ``rollcast-batch``
header). The reader is aiokafka (C record parsing; cramjam decompresses the
job's lz4 batches). A forecast counts as read when the reader has fetched it
and matched its key (the series) and ``last_window_end`` (one polars regex over
the first bytes of every record in the fetch, where that field is); after the
timed span every forecast of the round is parsed as JSON and checked against
its series and window. Parsing all
values inside the span (polars ``read_ndjson``, ~6 ms per 1,000 forecasts) or
in pure Python (kafka-python plus ``json.loads``, ~20 us per record) would time
the reader's own work, not when the forecasts became readable.
With tansu, which answers a fetch only when ``fetch_max_wait_ms`` has passed,
that setting (``--fetch-max-wait-ms``, used by the job and the reader) is a
floor on each hop; a Kafka broker answers as soon as data arrives. Unset, it is
what the embedded stack (``rollcast up``) gives its jobs
(``pipeline.processes.embedded_env``).

    python benchmarks/forecast_latency.py --series 1000 10000 --models tcn lstm --rounds 200
    python benchmarks/forecast_latency.py --series 1000 --fetch-max-wait-ms 2 --repeat 5   # the goal's count

p99 needs a few hundred rounds: of 30 it is the slowest round or nearly (the
default is 200 rounds; a 1,000-series round takes ~0.1 s, a 10,000-series one
~0.5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl

import models
from pipeline import processes
from pipeline.config import Settings, load_settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.runtime import freeze_heap
from pipeline.store import HistoryStore, Progress
from pipeline.windows import WINDOW_SCHEMA
from pipeline.windows_io import WindowRouter

ROOT = Path(__file__).resolve().parents[1]

STEP = 60_000
FETCH_WAIT_MS: int | None = None  # set from --fetch-max-wait-ms
THREADS: int | None = None  # set from --inference-threads
RUNTIME: str | None = None  # set from --runtime
T0 = 1_700_000_000_000 // STEP * STEP
WINDOW_END = r'"last_window_end":(\d+)'
HEAD_BYTES = 160  # "series" (this benchmark's short names), "issued_at" and "last_window_end" come first


def windows_at(series: list[str], index: int, rng: np.random.Generator) -> pl.DataFrame:
    v = rng.normal(100, 5, len(series))
    start = T0 + index * STEP
    return pl.DataFrame(
        {"series": series, "window_start": [start] * len(series), "window_end": [start + STEP] * len(series),
         "count": [5] * len(series), "first": v, "last": v, "min": v - 1, "max": v + 1, "mean": v, "sum": 5 * v},
        schema=WINDOW_SCHEMA,
    )


# "scores" runs in the job's score thread, after the batch's forecasts are acknowledged (off the path timed)
STAGES = ("arrival", "decode", "context", "inference", "scoring", "messages", "send", "commit", "scores")


def scrape(port: int) -> dict[str, float]:
    """Sums of the job's inference and per-stage histograms, and per stage the observations over 100 ms
    (``slow:<stage>``: the histogram's count minus its 0.1 s bucket)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(series: str) -> float:
        m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    out = {name: value(name) for name in ("rollcast_forecast_inference_seconds_sum",
                                          "rollcast_forecast_inference_seconds_count",
                                          "rollcast_forecast_end_to_end_seconds_sum")}
    for stage in STAGES:
        out[stage] = value(f'rollcast_forecast_stage_seconds_sum{{stage="{stage}"}}')
        out[f"slow:{stage}"] = (value(f'rollcast_forecast_stage_seconds_count{{stage="{stage}"}}')
                                - value(f'rollcast_forecast_stage_seconds_bucket{{le="0.1",stage="{stage}"}}'))
    return out


def run_case(bootstrap: str, model_name: str, n_series: int, rounds: int, context: int, horizon: int,
             work: Path, embedded: bool = True) -> dict:
    """One case; ``embedded``: the broker is this benchmark's own tansu, and the job gets what the embedded
    stack sets for it (``processes.embedded_env``) unless --fetch-max-wait-ms says otherwise."""
    suffix = f"{model_name}-{n_series}-{os.getpid()}-{int(time.time())}"
    metrics_port = processes.free_port()
    env = {
        "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "ROLLCAST_KAFKA__PARTITIONS": "4",
        "ROLLCAST_DATA_DIR": str(work / suffix),
        "ROLLCAST_TOPICS__WINDOWS": f"win-{suffix}",
        "ROLLCAST_TOPICS__FORECASTS": f"fc-{suffix}",
        "ROLLCAST_TOPICS__OBSERVATIONS": f"obs-{suffix}",
        "ROLLCAST_TOPICS__DLQ": f"dlq-{suffix}",
        "ROLLCAST_GROUPS__FORECAST": f"g-{suffix}",
        "ROLLCAST_WINDOW__LENGTH_MS": str(STEP),
        "ROLLCAST_MODEL__CONTEXT": str(context),
        "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(metrics_port),
        "ROLLCAST_OBSERVABILITY__LOG_LEVEL": "WARNING",
        **({"ROLLCAST_KAFKA__FETCH_MAX_WAIT_MS": str(FETCH_WAIT_MS)} if FETCH_WAIT_MS is not None
           else processes.embedded_env(load_settings(env={}), "forecast") if embedded else {}),
        **({"ROLLCAST_FORECAST__INFERENCE_THREADS": str(THREADS)} if THREADS is not None else {}),
        **({"ROLLCAST_FORECAST__RUNTIME": RUNTIME} if RUNTIME is not None else {}),
    }
    settings: Settings = load_settings(env=env)
    ensure_topics(settings)
    rng = np.random.default_rng(0)
    series = [f"s{i:05d}" for i in range(n_series)]
    history = pl.concat([windows_at(series, i, rng) for i in range(context)])
    HistoryStore(settings).write_checkpoint("seed", 0, history, Progress(0, None))
    # saved as training saves it, with its ONNX graph: forecast.runtime says which form serves
    # with the quantiles the settings give (the default: 0.01, 0.1, 0.5, 0.9, 0.99, so anomalies are flagged)
    model_dir = models.save_model(models.create_model(model_name, context=context, horizon=horizon,
                                                      quantiles=list(settings.model.quantiles)),
                                  work / suffix / "model")

    log = open(work / f"{suffix}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "forecast", "--model-dir", str(model_dir)],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        latencies, before, after = asyncio.run(_rounds(settings, bootstrap, series, context, rounds, metrics_port))
    finally:
        proc.terminate()
        proc.wait(60)
    lat = np.array(latencies)
    inf_sum = after["rollcast_forecast_inference_seconds_sum"] - before["rollcast_forecast_inference_seconds_sum"]
    return {
        "model": model_name, "series": n_series, "rounds": rounds,
        "p50_ms": float(np.percentile(lat, 50) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000),
        "max_ms": float(lat.max() * 1000),
        "inference_share": float(inf_sum / lat.sum()),
        "inference_mean_ms": float(inf_sum / rounds * 1000),
        "stages_ms": {k: (after[k] - before[k]) / rounds * 1000 for k in STAGES},
        # the job's own view: from the window message's timestamp (set by this producer) to the acks
        "job_ms": (after["rollcast_forecast_end_to_end_seconds_sum"]
                   - before["rollcast_forecast_end_to_end_seconds_sum"]) / rounds * 1000,
        "batches": (after["rollcast_forecast_inference_seconds_count"]
                    - before["rollcast_forecast_inference_seconds_count"]) / rounds,
        # rounds over 100 ms, and which of the job's stages took over 100 ms in them (none: the time went
        # outside the job's stages, e.g. in the broker, the reader or between polls)
        "slow_rounds_ms": [round(x * 1000, 1) for x in latencies if x > 0.1],
        "slow_stages": {k: int(after[f"slow:{k}"] - before[f"slow:{k}"]) for k in STAGES
                        if after[f"slow:{k}"] > before[f"slow:{k}"]},
    }


async def _rounds(settings: Settings, bootstrap: str, series: list[str], context: int, rounds: int,
                  metrics_port: int) -> tuple[list[float], dict[str, float], dict[str, float]]:
    """Two warm-up rounds (the job is serving once forecasts come back), then ``rounds`` timed ones."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    topic = settings.topics.forecasts
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                              fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
                              max_partition_fetch_bytes=64 << 20, fetch_max_bytes=256 << 20)
    await reader.start()
    producer = make_producer(settings)  # as ingest's: one produce request for all partitions
    rng = np.random.default_rng(1)
    try:
        reader.assign([TopicPartition(topic, p) for p in range(settings.kafka.partitions)])
        await reader.seek_to_beginning()  # a fresh topic: every forecast is read
        router = WindowRouter(settings.kafka.partitions)
        for i in range(2):
            await _one_round(settings, producer, reader, router, series, context + i, rng, timeout=180)
        # as the job does: a full collection of this process's start-up objects (torch, polars) takes ~0.3 s
        # and would land in whichever round triggers it
        freeze_heap()
        before = await asyncio.to_thread(scrape, metrics_port)
        latencies = [await _one_round(settings, producer, reader, router, series, context + 2 + r, rng, timeout=60)
                     for r in range(rounds)]
        after = await asyncio.to_thread(scrape, metrics_port)
    finally:
        await reader.stop()
        producer.close()
    return latencies, before, after


async def _one_round(settings: Settings, producer, reader, router: WindowRouter, series: list[str], index: int,
                     rng: np.random.Generator, timeout: float) -> float:
    batch = windows_at(series, index, rng)
    end = T0 + index * STEP + STEP
    want = set(series)
    t0 = time.perf_counter()
    for partition, value, headers in router.batch(batch):  # as ingest's checkpoint does
        producer.send(settings.topics.windows, value, partition=partition, headers=headers)
    producer.flush()
    deadline = time.monotonic() + timeout
    values: list[bytes] = []
    while want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(want)} forecasts for window end {end} did not arrive in {timeout}s")
        fetched = await reader.getmany(timeout_ms=50)
        records = [rec for recs in fetched.values() for rec in recs]
        if records:  # which series each forecast is for (its key) and for which window (one regex for all)
            # the fields sit at the start of the document: match on its first bytes, keep the whole record
            heads = pl.Series([r.value[:HEAD_BYTES] for r in records], dtype=pl.Binary)
            mine = np.flatnonzero((heads.cast(pl.String).str.extract(WINDOW_END, 1).cast(pl.Int64) == end)
                                  .fill_null(False).to_numpy())
            want.difference_update(records[i].key.decode() for i in mine)
            values.extend(records[i].value for i in mine)
    elapsed = time.perf_counter() - t0
    # outside the timed span: every forecast of the round is a whole JSON document for that series and window
    parsed = pl.read_ndjson(b"\n".join(values), schema={"series": pl.String, "last_window_end": pl.Int64})
    if set(parsed["series"]) != set(series) or (parsed["last_window_end"] != end).any():
        raise AssertionError(f"forecasts for window end {end} do not parse to their series and window")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--models", nargs="+", default=["tcn", "lstm"])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--context", type=int, default=96)
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--bootstrap", help="use this broker instead of starting tansu")
    ap.add_argument("--fetch-max-wait-ms", type=int,
                    help="kafka.fetch_max_wait_ms for the job and the reader (default: what the embedded stack "
                    "sets, pipeline.processes.embedded_env, with this benchmark's own broker; the setting's "
                    "default with --bootstrap)")
    ap.add_argument("--inference-threads", type=int,
                    help="forecast.inference_threads for the job (default: the setting's default)")
    ap.add_argument("--runtime", choices=["onnxruntime", "eager"],
                    help="forecast.runtime for the job (default: the setting's default)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every case this many times (each with a fresh broker and job), interleaved, and "
                    "say in how many runs p99 met --goal-ms: one run's p99 moves a lot on a shared host")
    ap.add_argument("--goal-ms", type=float, default=50.0, help="the p99 goal the summary counts (default 50)")
    args = ap.parse_args()
    global FETCH_WAIT_MS, THREADS, RUNTIME
    FETCH_WAIT_MS, THREADS, RUNTIME = args.fetch_max_wait_ms, args.inference_threads, args.runtime
    print(f"forecast.runtime: {args.runtime or Settings().forecast.runtime}\n")
    work = Path(tempfile.mkdtemp(prefix="rollcast-latency-"))
    print("| run | model | series | rounds | p50 (ms) | p99 (ms) | slowest (ms) | inference per batch (ms) "
          "| inference share |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for run in range(1, args.repeat + 1):
        for n in args.series:
            for name in args.models:
                # a fresh tansu per case: it keeps every forecast in memory (~9 MB a round at 10,000 series),
                # and rounds slowed as earlier cases' data piled up (p99 1.4 s for the last case of a run)
                bootstrap, broker = processes.broker_unless_given(args.bootstrap, work / f"broker-{name}-{n}-{run}")
                try:
                    r = run_case(bootstrap, name, n, args.rounds, args.context, args.horizon, work,
                                 embedded=broker is not None)
                finally:
                    if broker is not None:
                        broker.stop()
                print(f"| {run} | {r['model']} | {r['series']} | {r['rounds']} | {r['p50_ms']:.1f} "
                      f"| {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['inference_mean_ms']:.1f} "
                      f"| {r['inference_share']:.0%} |", flush=True)
                results.append((run, r))
    print("\nThe job's time per round by stage, mean ms (from rollcast_forecast_stage_seconds):\n")
    print("| run | model | series | " + " | ".join(STAGES)
          + " | batches per round | window produced -> acks, per batch, job's view |")
    print("|---|---|---|" + "---|" * (len(STAGES) + 2))
    for run, r in results:
        ms, batches = r["stages_ms"], r["batches"]
        print(f"| {run} | {r['model']} | {r['series']} | " + " | ".join(f"{ms[k]:.1f}" for k in STAGES)
              + f" | {batches:.2f} | {r['job_ms'] / batches:.1f} |")
    slow = [(run, r) for run, r in results if r["slow_rounds_ms"]]
    if slow:
        print("\nRounds over 100 ms, and the job's stages that took over 100 ms in the same run:\n")
        for run, r in slow:
            stages = ", ".join(f"{k} {n}" for k, n in r["slow_stages"].items()) or "none"
            print(f"- run {run}, {r['model']}, {r['series']} series: {len(r['slow_rounds_ms'])} round(s) ("
                  + ", ".join(f"{v:.1f}" for v in r["slow_rounds_ms"]) + f" ms); stages: {stages}")
    if args.repeat > 1:
        print(f"\np99 <= {args.goal_ms:g} ms:\n")
        for n in args.series:
            for name in args.models:
                p99 = [r["p99_ms"] for _, r in results if r["model"] == name and r["series"] == n]
                met = sum(v <= args.goal_ms for v in p99)
                print(f"- {name}, {n} series: {met} of {len(p99)} runs (p99 " + ", ".join(f"{v:.1f}" for v in p99)
                      + " ms)")


if __name__ == "__main__":
    main()
