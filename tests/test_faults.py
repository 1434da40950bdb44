"""Fault injection against real processes: kill -9, a broker restart, an MLflow outage, a burst of bad input.

Every test prints one summary line, ``FAULTS <name>: windows_lost=… windows_duplicated=…
forecasts_missing=…``, asserts those counts are zero, and asserts the jobs answer
``/healthz`` with 200 afterwards. Run alone with ``pytest -m fault``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from kafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

import models
from jobs import stack
from jobs.stack import Child
from pipeline.config import Settings, load_settings
from pipeline.kafka import ensure_topics, make_consumer
from pipeline.store import HistoryStore
from tests.conftest import S3_KEYS, create_bucket
from tests.jobs.helpers import wait_for
from tests.jobs.ingest_support import (
    INGEST_ENV,
    assert_frames_equal,
    consume_all,
    ingest_child,
    make_observations,
    malformed_kinds,
    produce,
    produce_raw,
    reference,
    reference_and_late,
)
from tests.jobs.test_forecast import produce_windows
from tests.jobs.train_helpers import WEAK, drifting_daily_windows, train_env, write_windows

pytestmark = [pytest.mark.slow, pytest.mark.fault]

L, H = 8, 3
KEYS = ["series", "window_start"]


# ----------------------------------------------------------------------------- helpers


def healthz(port: int) -> tuple[int | None, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return None, {}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:  # not serving yet
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in scrape(port).items() if n == name and want <= set(lab))


def job_env(base: dict[str, str], metrics_port: int, **extra: str) -> dict[str, str]:
    return {**os.environ, **base, **INGEST_ENV, "PYTHONUNBUFFERED": "1",
            "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(metrics_port),
            "ROLLCAST_OBSERVABILITY__SHUTDOWN_TIMEOUT_S": "20",
            "ROLLCAST_KAFKA__CONNECT_TIMEOUT_S": "5", "ROLLCAST_MODEL__CONTEXT": str(L), **extra}


def start_job(name: str, env: dict[str, str], log: Path, *args: str) -> Child:
    return Child(name, [sys.executable, "-m", "jobs.cli", *args], log, env=env).start()


def start_ingest(base: dict[str, str], tmp: Path, name: str, port: int) -> Child:
    return ingest_child({**base, "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(port),
                         "ROLLCAST_OBSERVABILITY__SHUTDOWN_TIMEOUT_S": "20"}, tmp, name)


def start_forecast(base: dict[str, str], tmp: Path, name: str, port: int, model_dir: Path | None) -> Child:
    args = ["forecast", *(["--model-dir", str(model_dir)] if model_dir else [])]
    return start_job(name, job_env(base, port), tmp / f"{name}.log", *args)


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
    return sum(f.stat().st_mtime_ns for f in d.glob("*.json")) if d.is_dir() else 0


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
    consumer = make_consumer(s, None)
    tps = [TopicPartition(s.topics.forecasts, p) for p in consumer.partitions_for_topic(s.topics.forecasts) or []]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    seen: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not expected <= seen.keys():
            for records in consumer.poll(timeout_ms=300).values():
                for rec in records:
                    msg = json.loads(rec.value)
                    key = (msg["series"], msg["last_window_end"])
                    seen[key] = seen.get(key, 0) + 1
    finally:
        consumer.close()
    return seen


def store_complete(s: Settings, want: pl.DataFrame) -> bool:
    got = HistoryStore(s).read().select(KEYS)
    return want.select(KEYS).join(got, on=KEYS, how="anti").height == 0


def counts(got: pl.DataFrame, want: pl.DataFrame) -> tuple[int, int]:
    """(windows of ``want`` missing from ``got``, rows of ``got`` that repeat a key)."""
    lost = want.select(KEYS).join(got.select(KEYS), on=KEYS, how="anti").height
    duplicated = got.height - got.select(KEYS).unique().height
    return lost, duplicated


def report(name: str, **figures: int) -> None:
    line = f"FAULTS {name}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    print(line, flush=True)
    bad = {k: v for k, v in figures.items() if k != "dlq" and v}
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
    ip, fp = stack.free_port(), stack.free_port()
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
        lost, duplicated = counts(got, want)
        report("kill9-ingest-forecast", windows_lost=lost, windows_duplicated=duplicated,
               forecasts_missing=len(expected - seen.keys()))
        assert_frames_equal(got.sort(KEYS), want)
        healthy(ingest, ip)
        healthy(forecast, fp)
    finally:
        for child in (ingest, forecast):
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
    port, binary = stack.free_port(), stack.broker_binary(None)

    def start(log_dir: Path) -> Child:
        return stack.start_broker(binary, port, log_dir, storage=f"s3://{bucket}/", env=env)

    state = {"port": port, "start": start, "child": start(tmp_path / "broker-1")}
    yield state
    state["child"].stop()


def test_broker_restart_mid_stream(private_broker, test_env, tmp_path, model_dir) -> None:
    env = {**test_env, "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{private_broker['port']}"}
    s = load_settings(env={**env, **INGEST_ENV})
    ensure_topics(s)
    before = produce(s, make_observations(2000, series=4, seed=21))
    first = reference(before)
    ip, fp = stack.free_port(), stack.free_port()
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
        lost, duplicated = counts(got, both)
        if expected - seen.keys():
            print(forecast.tail(60), flush=True)
        report("broker-restart", windows_lost=lost, windows_duplicated=duplicated,
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
    from pipeline.decode import Decoder
    from tests.pipeline.fuzz_decode import MAX_TS, MIN_TS, build_case

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


def read_to_end(s: Settings, topic: str) -> list:
    """Every record of ``topic`` up to its end offsets now."""
    consumer = make_consumer(s, None)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    end = consumer.end_offsets(parts)
    got: list = []
    deadline = time.monotonic() + 60
    while any(consumer.position(tp) < end[tp] for tp in parts) and time.monotonic() < deadline:
        for recs in consumer.poll(timeout_ms=200).values():
            got.extend(recs)
    consumer.close()
    return got


FUZZ_REGRESSIONS = Path(__file__).parent / "pipeline" / "fuzz_corpus" / "regressions"
BURST_T0 = 4_000_000_000_000  # after any event of a regression case (checked), before window.max_ts_ms


def test_burst_of_malformed_messages_all_reach_the_dlq(settings, test_env, tmp_path) -> None:
    """Every fuzzer regression case, then 10,000 malformed messages of every known kind mixed with valid
    observations, to a running `rollcast ingest`: each malformed message is in the DLQ exactly once
    with its reason, the valid ones are windowed exactly as the reference computes from them alone,
    and /healthz answers 200 throughout."""
    s = load_settings(env={**test_env, **INGEST_ENV})
    ip = stack.free_port()
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
        dlq = consume_all(s, s.topics.dlq, lambda g: len(g) >= n_bad + late + n_reg, timeout_s=120)
        wait_for(lambda: store_complete(s, want), 120, "the valid observations' windows")
        done.set()
        poller.join()
        healthy(ingest, ip)
        assert metric(ip, "rollcast_ingest_rejected_total", reason="undecodable") == 0
        assert ingest.stop(30) == 0, ingest.tail(30)
        dlq = read_to_end(s, s.topics.dlq)
        by_source: dict[tuple[int, int], list[str]] = {}
        for r in dlq:
            h = dict(r.headers)
            assert h["rollcast-source-topic"].decode() == s.topics.observations
            by_source.setdefault((int(h["rollcast-source-partition"]), int(h["rollcast-source-offset"])), []).append(
                h["rollcast-reason"].decode())
        wrong = {expect[i]: by_source.get(at[i]) for i in expect if by_source.get(at[i]) != [expect[i][1]]}
        got = HistoryStore(s).read()
        got = got.filter(pl.col("series").str.starts_with("valid-"))
        lost, duplicated = counts(got, want)
        late_seen = sum(by_source.get(at[i]) == ["late"] for i in range(len(messages)) if i not in expect)
        report("malformed-burst", windows_lost=lost, windows_duplicated=duplicated, forecasts_missing=0,
               dlq_wrong=len(wrong), late_missing=late - late_seen, dlq=len(dlq))
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
    port = stack.free_port()
    root = tmp_path / "mlflow"
    state = {"port": port, "root": root, "child": stack.start_mlflow(root, port, root / "logs-1", timeout_s=180)}
    yield state
    state["child"].stop()


def train_job_env(uri: str, data_dir: Path, base: dict[str, str], port: int) -> dict[str, str]:
    return {**os.environ, **base, **train_env(uri, data_dir, **WEAK), "PYTHONUNBUFFERED": "1",
            "ROLLCAST_OBSERVABILITY__METRICS_PORT": str(port),
            "ROLLCAST_OBSERVABILITY__SHUTDOWN_TIMEOUT_S": "20"}


def cycles(port: int, *outcomes: str) -> float:
    return sum(metric(port, "rollcast_train_cycles_total", outcome=o) for o in outcomes)


def test_train_kill9_mid_cycle_and_mlflow_outage(private_mlflow, settings, test_env, tmp_path) -> None:
    uri = f"http://127.0.0.1:{private_mlflow['port']}"
    data_dir = Path(test_env["ROLLCAST_DATA_DIR"])
    tp = stack.free_port()
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
    fp = stack.free_port()
    forecast = None
    try:
        wait_for(lambda: cycles(tp, "promoted", "not_promoted") >= 1, 180,
                 "a successful cycle after the kills")
        from jobs import registry

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

        private_mlflow["child"] = stack.start_mlflow(private_mlflow["root"], private_mlflow["port"],
                                                     private_mlflow["root"] / "logs-2", timeout_s=180)
        wait_for(lambda: cycles(tp, "promoted", "not_promoted") > ok_before, 180, "a successful cycle after MLflow")
        report("train-kill9-mlflow-outage", windows_lost=0, windows_duplicated=0,
               forecasts_missing=len(expected - seen.keys()))
        healthy(train, tp)
        healthy(forecast, fp)
    finally:
        train.stop(30)
        if forecast is not None:
            forecast.stop(30)

