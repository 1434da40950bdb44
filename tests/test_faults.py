"""Fault injection against real processes: kill -9, a broker restart, scale-out and scale-in, an MLflow
outage, a burst of bad input.

Every test prints one summary line, ``FAULTS <name>: windows_lost=… windows_duplicated=…
windows_wrong=… forecasts_missing=…``, asserts those counts are zero, and asserts the jobs answer
``/healthz`` with 200 afterwards. Every figure is counted from the history store, the topics and the
observations sent (windows against the per-event reference, tests/pipeline/reference.py); a figure a
test cannot measure (no ingest job, no forecast job) is left out of its line, not written as 0.
Run alone with ``pytest -m fault``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import models
from pipeline import processes
from pipeline.config import Settings, load_settings
from pipeline.kafka.clients import ensure_topics
from pipeline.processes import Child
from pipeline.store import HistoryStore
from pipeline.windows import WINDOW_SCHEMA
from pipeline.windows_io import decode_windows
from tests.support import healthz, metric, read_topic, wait_for
from tests.support.forecast import H, L, produce_windows
from tests.support.ingest import (
    INGEST_ENV,
    assert_frames_equal,
    checkpoints,
    make_observations,
    malformed_kinds,
    produce,
    produce_raw,
    progress_positions,
    reference,
    reference_and_late,
    start_forecast,
    start_ingest,
    start_job,
    window_faults,
)
from tests.support.s3 import S3_KEYS, create_bucket
from tests.support.train import WEAK, drifting_daily_windows, train_env, write_windows

pytestmark = [pytest.mark.slow, pytest.mark.fault]

KEYS = ["series", "window_start"]


# ----------------------------------------------------------------------------- helpers


def kill9(child: Child) -> None:
    os.killpg(child.pid, signal.SIGKILL)
    child.proc.wait()


def healthy(child: Child, port: int, timeout: float = 60) -> dict:
    def check() -> dict | None:
        assert child.alive(), f"{child.name} exited:\n{child.tail(30)}"
        code, body = healthz(port)
        return body if code == 200 else None

    return wait_for(check, timeout, f"{child.name} /healthz 200")


def progress_stamp(s: Settings) -> int:
    d = s.history_dir / "_progress"
    return sum(f.stat().st_mtime_ns for f in d.glob("*/*.json")) if d.is_dir() else 0


def forecastable(windows: pl.DataFrame, target: str = "mean") -> set[tuple[str, int]]:
    """(series, window_end) of every window the forecast job can forecast: a full context of L
    windows on the regular grid whose first value is not a gap (the job's rule)."""
    out = set()
    for (s,), part in windows.sort("window_start").group_by("series", maintain_order=True):
        counts = part["count"].to_numpy()
        ends = part["window_end"].to_numpy()
        vals = part[target].to_numpy()
        for i in range(L - 1, part.height):
            regular = ends[i] - ends[i - L + 1] == (L - 1) * (ends[1] - ends[0] if part.height > 1 else 0)
            if regular and counts[i - L + 1] > 0 and not np.isnan(vals[i - L + 1]):
                out.add((s, int(ends[i])))
    return out


def forecast_keys(s: Settings, expected: set[tuple[str, int]], timeout: float) -> dict[tuple[str, int], int]:
    """(series, last_window_end) -> number of forecast messages, read until ``expected`` is covered."""
    seen: dict[tuple[str, int], int] = {}
    read = [0]

    def covered(records: list) -> bool:
        for rec in records[read[0]:]:
            msg = json.loads(rec.value)
            key = (msg["series"], msg["last_window_end"])
            seen[key] = seen.get(key, 0) + 1
        read[0] = len(records)
        return expected <= seen.keys()

    read_topic(s, s.topics.forecasts, covered, timeout=timeout)
    return seen


def store_complete(s: Settings, want: pl.DataFrame) -> bool:
    got = HistoryStore(s).read().select(KEYS)
    return want.select(KEYS).join(got, on=KEYS, how="anti").height == 0


# figures a FAULTS line reports that are sizes, not faults
SIZES = frozenset({"dlq", "observations", "windows", "forecasts"})


def report(name: str, **figures: int) -> None:
    """Print one FAULTS line of measured figures and assert every fault count in it is 0."""
    line = f"FAULTS {name}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    print(line, flush=True)
    bad = {k: v for k, v in figures.items() if k not in SIZES and v}
    assert not bad, line


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return models.save_model(models.create_model("tcn", context=L, horizon=H, seed=3), tmp_path / "model")


# ----------------------------------------------------------------------------- kill -9


def test_kill9_ingest_and_forecast_repeatedly(settings, test_env, tmp_path, model_dir) -> None:
    s = load_settings(env={**test_env, **INGEST_ENV})
    sent = produce(s, make_observations(8000, series=6, seed=11))
    want = reference(sent)
    rng = random.Random(int(os.environ.get("ROLLCAST_FAULT_SEED", "2024")))
    ip, fp = processes.free_port(), processes.free_port()
    forecast = start_forecast(test_env, tmp_path, "forecast-0", fp, model_dir)
    ingest = None
    try:
        for i in range(3):
            before = progress_stamp(s)
            ingest = start_ingest(test_env, tmp_path, f"ingest-{i}", ip)
            wait_for(lambda b=before: progress_stamp(s) != b, 60, "an ingest checkpoint")
            for _ in range(rng.randint(0, 4)):  # a random number of further checkpoints
                b2 = progress_stamp(s)
                wait_for(lambda b=b2: progress_stamp(s) != b or store_complete(s, want), 30, "a checkpoint")
            kill9(ingest)
            if i < 2:  # the forecast job dies at a random moment too, and comes back
                time.sleep(rng.uniform(0, 1.0))  # where it dies is random, not what the test waits on
                kill9(forecast)
                forecast = start_forecast(test_env, tmp_path, f"forecast-{i + 1}", fp, model_dir)
        ingest = start_ingest(test_env, tmp_path, "ingest-final", ip)
        wait_for(lambda: store_complete(s, want), 120, "every reference window in the store")
        got = HistoryStore(s).read()
        expected = forecastable(want)
        seen = forecast_keys(s, expected, 120)
        stored = window_faults(got, want)
        report("kill9-ingest-forecast", windows_lost=stored["lost"], windows_duplicated=stored["duplicated"],
               windows_wrong=stored["wrong"] + stored["unexpected"],
               forecasts_missing=len(expected - seen.keys()))
        assert_frames_equal(got.sort(KEYS), want)
        healthy(ingest, ip)
        healthy(forecast, fp)
    finally:
        for child in (ingest, forecast):
            if child is not None:
                child.stop(30)


# ----------------------------------------------------------------------------- scale out and in


def topic_windows(s: Settings, want: pl.DataFrame, timeout: float) -> pl.DataFrame:
    """Every row of every message on the windows topic, repeats kept, read until it covers ``want``."""
    wanted, seen, frames = set(want.select(KEYS).iter_rows()), set(), []

    def covered(records: list) -> bool:
        for rec in records[len(frames):]:
            frames.append(pl.from_arrow(decode_windows(rec.value)))
            seen.update(frames[-1].select(KEYS).iter_rows())
        return wanted <= seen

    read_topic(s, s.topics.windows, covered, timeout=timeout)
    return pl.concat(frames) if frames else pl.DataFrame(schema=WINDOW_SCHEMA)


def assigned(child: Child, timeout: float = 90) -> None:
    """Wait until a job process logged an assignment of partitions (it is working on them)."""
    wait_for(lambda: "assigned partition" in child.log_path.read_text() or not child.alive(), timeout,
             f"{child.name} to be assigned partitions")
    assert child.alive(), child.tail(30)


def test_scale_out_and_in_under_live_traffic(settings3, test_env, tmp_path, model_dir) -> None:
    """A replay at a steady rate; meanwhile ingest goes 1 -> 3 -> 1 processes and forecast 1 -> 2 -> 1
    (joins, then SIGTERM: clean leaves), and the stream goes on after the scale-in. The store and the
    windows topic are compared, window by window, with the per-event reference computed from the
    observations read back from their topic; every forecastable window must have its forecast."""
    s = load_settings(env={**test_env, **INGEST_ENV})
    obs = pl.DataFrame(make_observations(6_000, series=6, seed=41))
    data = tmp_path / "observations.csv"
    obs.write_csv(data)
    span_s = (obs["ts"].max() - obs["ts"].min()) / 1000
    # at most 150 s of replay; it is stopped once the scale-in is done and more traffic followed it,
    # so a slow start of the new processes (a busy machine) lengthens the test instead of failing it
    speed = span_s / 150
    ip, fp = [processes.free_port() for _ in range(3)], [processes.free_port() for _ in range(2)]
    ingest = [start_ingest(test_env, tmp_path, "ingest-0", ip[0])]
    forecast = [start_forecast(test_env, tmp_path, "forecast-0", fp[0], model_dir)]
    replay = None
    try:
        healthy(ingest[0], ip[0])
        healthy(forecast[0], fp[0], 120)
        replay = start_job("replay", {**os.environ, **test_env}, tmp_path / "replay.log", "replay", str(data),
                           "--speed", f"{speed:.3f}", "--no-progress")
        store = HistoryStore(s)
        step = 0.04 * len(obs["series"].unique()) * span_s  # about 4% of the windows (one a second a series)

        def more_windows(what: str) -> None:
            grown = store.count() + step
            wait_for(lambda: store.count() >= grown or not replay.alive(), 60, what)
            assert replay.alive(), f"the replay ended before {what}; slow it down"

        # forecast-1 builds its buffers from the store while windows flow; those forecast-0 reads from
        # then until the rebalance are in neither forecast-1's buffers nor what it will be sent
        forecast.append(start_forecast(test_env, tmp_path, "forecast-1", fp[1], model_dir))
        wait_for(lambda: "rebuilt context" in forecast[1].log_path.read_text() or not forecast[1].alive(), 90,
                 "forecast-1 to build its buffers")
        ingest += [start_ingest(test_env, tmp_path, f"ingest-{i}", ip[i]) for i in (1, 2)]
        for child in (*ingest[1:], forecast[1]):
            assigned(child)
        more_windows("windows stored while scaled out")
        for child in (*ingest[1:], forecast[1]):
            assert child.stop(30) == 0, child.tail(30)
        more_windows("windows stored after the scale-in")
        replay.stop(10)

        sent = [(r.partition, r.offset, json.loads(r.value)) for r in read_topic(s, s.topics.observations)]
        want = reference(sent)
        ends = {p: max(off for q, off, _ in sent if q == p) + 1 for p in {q for q, _, _ in sent}}
        wait_for(lambda: progress_positions(store, s.topics.observations, 3) == ends, 90,
                 f"ingest-0 to read every observation; log:\n{ingest[0].tail(30)}")
        done = checkpoints(store)  # the next checkpoint starts after that one's files were moved
        wait_for(lambda: checkpoints(store) != done, 30, "one more checkpoint")
        stored = window_faults(store.read(), want)
        on_topic = window_faults(topic_windows(s, want, 60), want)
        expected = forecastable(want)
        seen = forecast_keys(s, expected, 90)
        report("scale-out-in", observations=len(sent), windows=want.height, windows_lost=stored["lost"],
               windows_duplicated=stored["duplicated"], windows_wrong=stored["wrong"] + stored["unexpected"],
               topic_windows_lost=on_topic["lost"], topic_windows_duplicated=on_topic["duplicated"],
               topic_windows_wrong=on_topic["wrong"] + on_topic["unexpected"], forecasts=len(expected),
               forecasts_missing=len(expected - seen.keys()))
        healthy(ingest[0], ip[0])
        healthy(forecast[0], fp[0])
    finally:
        for child in (replay, *ingest, *forecast):
            if child is not None:
                child.stop(30)


# ----------------------------------------------------------------------------- broker restart


@pytest.fixture
def private_broker(tmp_path: Path, s3_server: str) -> Iterator[dict]:
    """A tansu of this test's own on a fixed port, so it can be stopped and started again.

    It keeps its topics, records and committed offsets in a bucket of its own on the moto S3 server,
    so that, like a Kafka broker, it restarts with everything it had acknowledged.
    """
    bucket = f"tansu-{uuid.uuid4().hex[:10]}"
    create_bucket(s3_server, bucket)
    access, secret = S3_KEYS.split(":")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": f"http://{s3_server}", "AWS_ALLOW_HTTP": "true"}
    port, binary = processes.free_port(), processes.broker_binary(None)

    def start(log_dir: Path) -> Child:
        return processes.start_broker(binary, port, log_dir, storage=f"s3://{bucket}/", env=env)

    state = {"port": port, "start": start, "child": start(tmp_path / "broker-1")}
    yield state
    state["child"].stop()


def test_broker_restart_mid_stream(private_broker, test_env, tmp_path, model_dir) -> None:
    env = {**test_env, "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{private_broker['port']}"}
    s = load_settings(env={**env, **INGEST_ENV})
    ensure_topics(s)
    before = produce(s, make_observations(2000, series=4, seed=21))
    first = reference(before)
    ip, fp = processes.free_port(), processes.free_port()
    ingest = start_ingest(env, tmp_path, "ingest", ip)
    forecast = start_forecast(env, tmp_path, "forecast", fp, model_dir)
    try:
        # the outage starts as soon as the first forecasts are out: both jobs are mid-stream
        wait_for(lambda: forecast_keys(s, forecastable(first), 0.5), 90, "the first forecasts")
        private_broker["child"].stop()
        for child, port in ((ingest, ip), (forecast, fp)):
            body = wait_for(lambda c=child, p=port: (lambda r: r[1] if r[0] == 503 else None)(healthz(p)), 30,
                            f"{child.name} /healthz 503")
            assert any("broker unreachable" in p for p in body["problems"]), body
        assert ingest.alive() and forecast.alive()  # both saw the outage (503) and ride it out

        private_broker["child"] = private_broker["start"](tmp_path / "broker-2")
        shift = 10_000_000  # event times well after the first part's
        after = produce(s, [dict(o, ts=o["ts"] + shift) for o in make_observations(2000, series=4, seed=22)])
        second = reference(after)
        both = pl.concat([first, second])
        wait_for(lambda: store_complete(s, both), 120, "the windows of both parts")
        got = HistoryStore(s).read()
        expected = forecastable(first) | forecastable(second)
        seen = forecast_keys(s, expected, 90)  # returns as soon as every expected forecast is there
        # windows open at the end of the first part, closed by the second, are in neither reference
        stored = window_faults(got, both)
        if expected - seen.keys():
            print(forecast.tail(60), flush=True)
        report("broker-restart", windows_lost=stored["lost"], windows_duplicated=stored["duplicated"],
               windows_wrong=stored["wrong"],
               forecasts_missing=len(expected - seen.keys()))
        assert_frames_equal(got.join(both.select(KEYS), on=KEYS).sort(KEYS), both.sort(KEYS))
        healthy(ingest, ip)
        healthy(forecast, fp)
        for child in (ingest, forecast):  # one clear line per outage, not a flood
            log = child.log_path.read_text()
            assert log.count("broker unreachable:") == 1, child.tail(40)
            assert "broker reachable again" in log
    finally:
        ingest.stop(30)
        forecast.stop(30)


# ----------------------------------------------------------------------------- bad input


def _regression_records() -> list[tuple[bytes | None, bytes | None, list, list[str]]]:
    """The records of every fuzzer regression case, each with the reasons the decoder alone gives it."""
    from pipeline.ingest.decode import Decoder
    from tests.support.fuzz_decode import MAX_TS, MIN_TS, build_case

    out = []
    for path in sorted(FUZZ_REGRESSIONS.iterdir()):
        f, records = build_case(path.read_bytes())
        if (f.series, f.ts, f.value) != ("series", "ts", "value"):
            continue  # the running job has the default field names
        decoder = Decoder(f, MIN_TS, MAX_TS)
        for r in records:
            if r.key is None and r.value is None:
                continue  # kafka-python cannot produce it (the DLQ's handling is checked by the fuzzer)
            # nor a null header value: send it empty
            r = r._replace(headers=[(k, b"" if v is None else v) for k, v in r.headers])
            decoded = decoder.decode([r])
            ts_max = decoded.events["ts"].max() if decoded.events.height else None
            assert ts_max is None or ts_max < BURST_T0 - 10_000, "a regression case would make the burst late"
            out.append((r.value, r.key, r.headers, [x.reason for x in decoded.rejected]))
    return out


FUZZ_REGRESSIONS = Path(__file__).parent / "pipeline" / "ingest" / "fuzz_corpus" / "regressions"
BURST_T0 = 4_000_000_000_000  # after any event of a regression case (checked), before window.max_ts_ms


def test_burst_of_malformed_messages_all_reach_the_dlq(settings, test_env, tmp_path) -> None:
    """Every fuzzer regression case, then 10,000 malformed messages of every known kind mixed with valid
    observations, to a running `rollcast ingest`: each malformed message is in the DLQ exactly once
    with its reason, the valid ones are windowed exactly as the reference computes from them alone,
    and /healthz answers 200 throughout."""
    s = load_settings(env={**test_env, **INGEST_ENV})
    ip = processes.free_port()
    ingest = start_ingest(test_env, tmp_path, "ingest", ip)
    codes: list[int | None] = []
    done = threading.Event()

    def poll_health() -> None:
        while not done.wait(0.25):
            codes.append(healthz(ip)[0])

    poller = threading.Thread(target=poll_health, daemon=True)
    try:
        healthy(ingest, ip)
        poller.start()
        regressions = _regression_records()
        reg_at = produce_raw(s, [(v, k, h) for v, k, h, _ in regressions])
        kinds = malformed_kinds()
        good = [{**o, "series": f"valid-{o['series']}"}
                for o in make_observations(3400, series=4, seed=31, t0=BURST_T0)]
        n_bad, messages, expect = 10_000, [], {}
        goods = iter(good)
        for i in range(n_bad):
            name, value, headers, reason = kinds[i % len(kinds)]
            messages.append((value, b"x%d" % (i % 7), headers))
            expect[len(messages) - 1] = (name, reason)
            if i % 3 == 0:
                o = next(goods)
                messages.append((json.dumps(o).encode(), o["series"].encode(), []))
        at = produce_raw(s, messages)
        sent = [(*at[i], json.loads(m[0])) for i, m in enumerate(messages) if i not in expect]
        want, late = reference_and_late(sent)
        n_reg = sum(len(r) for *_, r in regressions)
        dlq = read_topic(s, s.topics.dlq, n_bad + late + n_reg, timeout=120)
        wait_for(lambda: store_complete(s, want), 120, "the valid observations' windows")
        done.set()
        poller.join()
        healthy(ingest, ip)
        assert metric(ip, "rollcast_ingest_rejected_total", reason="undecodable") == 0
        assert ingest.stop(30) == 0, ingest.tail(30)
        dlq = read_topic(s, s.topics.dlq)  # the job has stopped: all of it, until quiet
        by_source: dict[tuple[int, int], list[str]] = {}
        for r in dlq:
            h = dict(r.headers)
            assert h["rollcast-source-topic"].decode() == s.topics.observations
            by_source.setdefault((int(h["rollcast-source-partition"]), int(h["rollcast-source-offset"])), []).append(
                h["rollcast-reason"].decode())
        wrong = {expect[i]: by_source.get(at[i]) for i in expect if by_source.get(at[i]) != [expect[i][1]]}
        got = HistoryStore(s).read()
        got = got.filter(pl.col("series").str.starts_with("valid-"))
        stored = window_faults(got, want)
        late_seen = sum(by_source.get(at[i]) == ["late"] for i in range(len(messages)) if i not in expect)
        report("malformed-burst", windows_lost=stored["lost"], windows_duplicated=stored["duplicated"],
               windows_wrong=stored["wrong"] + stored["unexpected"], dlq_wrong=len(wrong),
               late_missing=late - late_seen, dlq=len(dlq))
        assert not wrong, list(wrong.items())[:5]
        assert all(by_source.get(at[i], []) in ([], ["late"]) for i in range(len(messages)) if i not in expect)
        for (_, _, _, reasons), where in zip(regressions, reg_at, strict=True):
            assert sorted(x for x in by_source.get(where, []) if x != "late") == sorted(reasons), where
        assert len(dlq) == sum(map(len, by_source.values())) == n_bad + late + sum(
            len(by_source.get(w, [])) for w in reg_at)
        assert_frames_equal(got, want)
        assert codes and set(codes) == {200}, f"/healthz answered {sorted(set(codes), key=str)}"
    finally:
        done.set()
        ingest.stop(30)


# ----------------------------------------------------------------------------- MLflow and train


@pytest.fixture
def private_mlflow(tmp_path: Path) -> Iterator[dict]:
    port = processes.free_port()
    root = tmp_path / "mlflow"
    state = {"port": port, "root": root, "child": processes.start_mlflow(root, port, root / "logs-1", timeout_s=180)}
    yield state
    state["child"].stop()


def train_job_env(uri: str, data_dir: Path, base: dict[str, str], port: int) -> dict[str, str]:
    return {**os.environ, **base, **train_env(uri, data_dir, **WEAK), "PYTHONUNBUFFERED": "1",
            "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(port),
            "ROLLCAST_OBSERVABILITY__SHUTDOWN_TIMEOUT_S": "20",
            # every cycle a full retrain from the same seed and data: it never beats the champion, so the
            # champion stays put while the job retrains every few seconds (a warm start would improve on
            # it, and move the alias, on every cycle)
            "ROLLCAST_TRAIN__FULL_EVERY": "1"}


def cycles(port: int, *outcomes: str) -> float:
    return sum(metric(port, "rollcast_train_cycles_total", outcome=o) for o in outcomes)


def test_train_kill9_mid_cycle_and_mlflow_outage(private_mlflow, settings, test_env, tmp_path) -> None:
    uri = f"http://127.0.0.1:{private_mlflow['port']}"
    data_dir = Path(test_env["ROLLCAST_DATA_DIR"])
    tp = processes.free_port()
    env = train_job_env(uri, data_dir, test_env, tp)
    s = load_settings(env={k: v for k, v in env.items() if k.startswith("ROLLCAST_")})
    history = drifting_daily_windows(800)
    write_windows(s, history)
    args = ("train", "--every-minutes", "0.02", "--poll-s", "0.3", "--no-progress")
    rng = random.Random(5)
    # kill -9 mid-cycle at random points (while training or while logging to MLflow), twice
    for i in range(2):
        train = start_job(f"train-{i}", env, tmp_path / f"train-{i}.log", *args)
        wait_for(lambda t=train: "training tcn" in t.tail(50) or not t.alive(), 120, "a cycle to start")
        time.sleep(rng.uniform(0.0, 2.0))  # the random point of the kill, not a wait for a condition
        kill9(train)
    train = start_job("train-2", env, tmp_path / "train-2.log", *args)
    fp = processes.free_port()
    forecast = None
    try:
        wait_for(lambda: cycles(tp, "promoted", "not_promoted") >= 1, 180,
                 "a successful cycle after the kills")
        from models import tracking as registry

        champ = registry.champion(s)
        assert champ is not None, "no champion after a successful cycle"
        version, saved = champ
        loaded = models.load_model(saved)  # the champion is complete and loadable
        assert loaded.config.context == s.model.context

        # the forecast job serves the champion; MLflow goes away
        fenv = {**env, "ROLLCAST_WINDOW__LENGTH_MS": "3600000", "ROLLCAST_FORECAST__CHAMPION_POLL_S": "1",
                "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(fp)}
        forecast = start_job("forecast", fenv, tmp_path / "forecast.log", "forecast")
        wait_for(lambda: healthy(forecast, fp, 120).get("model_version") == version, 120,
                 "the forecast job serving the champion")
        private_mlflow["child"].stop()
        failed_before = cycles(tp, "mlflow_unavailable")
        wait_for(lambda: cycles(tp, "mlflow_unavailable") > failed_before, 120, "a cycle failing without MLflow")
        ok_before = cycles(tp, "promoted", "not_promoted")
        wait_for(lambda: metric(fp, "rollcast_forecast_mlflow_reachable") == 0, 60, "forecast noticing MLflow is gone")
        # new windows after the history: the forecast job keeps serving without MLflow
        last = int(history["window_start"].max())
        new = drifting_daily_windows(806).filter(pl.col("window_start") > last)
        write_windows(s, new)
        produce_windows(s, new)
        expected = {(x, int(e)) for x, e in new.select("series", "window_end").iter_rows()}
        seen = forecast_keys(s, expected, 60)
        assert forecast.alive() and healthz(fp)[0] == 200

        private_mlflow["child"] = processes.start_mlflow(private_mlflow["root"], private_mlflow["port"],
                                                     private_mlflow["root"] / "logs-2", timeout_s=180)
        wait_for(lambda: cycles(tp, "promoted", "not_promoted") > ok_before, 180, "a successful cycle after MLflow")
        # no ingest job here: the windows are written to the store by the test, so only forecasts are counted
        report("train-kill9-mlflow-outage",
               forecasts_missing=len(expected - seen.keys()))
        healthy(train, tp)
        healthy(forecast, fp)
    finally:
        train.stop(30)
        if forecast is not None:
            forecast.stop(30)

