"""The forecast job against the real broker: every window gets a forecast equal to offline inference."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import models
from models.scoring.accuracy import LiveAccuracy
from pipeline.config import Settings
from pipeline.kafka.clients import make_producer
from pipeline.scores_io import as_score
from pipeline.store import HistoryStore, Progress
from pipeline.windows_io import HEADERS
from tests.support import rollcast, start_rollcast, wait_for
from tests.support.forecast import (
    STEP,
    H,
    L,
    collect_forecasts,
    collect_scores,
    make_windows,
    offline,
    offline_scores,
    produce_windows,
)

# ----------------------------------------------------------------------------- pure logic
























# ----------------------------------------------------------------------------- helpers










QUANTILES = [0.01, 0.1, 0.5, 0.9, 0.99]  # the default: anomalies are flagged outside q0.01-q0.99


def offline_anomalies(seen: dict, windows: pl.DataFrame) -> dict[tuple[str, int], str]:
    """(series, window start) -> side of every actual outside the served q0.01-q0.99 of step 1 of the
    forecast issued when the window before it closed (its last_window_end is the window's start)."""
    out = {}
    for s, start, count, mean in windows.select("series", "window_start", "count", "mean").iter_rows():
        msgs = seen.get((s, start))
        if not msgs or not count:
            continue
        q = msgs[0]["points"][0]["quantiles"]
        lo, hi = float(np.float32(q["0.01"])), float(np.float32(q["0.99"]))
        if mean < lo or mean > hi:
            out[(s, start)] = "below" if mean < lo else "above"
    return out


def collect_anomalies(settings: Settings, expected: set[tuple[str, int]], timeout: float) -> dict:
    """Anomaly messages by (series, ts) (their last_window_end is their ts), read until every ``expected``
    one is there."""
    from tests.support.forecast import _collect

    return _collect(settings, settings.topics.anomalies, "anomalies", expected, timeout)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = models.create_model("tcn", context=L, horizon=H, seed=3, quantiles=QUANTILES)
    return models.save_model(model, tmp_path / "model")


# ----------------------------------------------------------------------------- against the broker


@pytest.mark.slow
def test_forecasts_equal_offline_inference_and_survive_kill_9(
    settings: Settings, test_env: dict[str, str], model_dir: Path, tmp_path: Path
) -> None:
    series = ["a", "b", "c"]
    windows = make_windows(series, 40)
    # a spike far outside any interval, in the windows the kill interrupts: an anomaly
    spike_at = windows["window_start"].min() + 24 * STEP
    windows = windows.with_columns(pl.when((pl.col("series") == "b") & (pl.col("window_start") == spike_at))
                                   .then(pl.col("mean") + 60.0).otherwise(pl.col("mean")).alias("mean"))
    stored = windows.filter(pl.col("window_start") < windows["window_start"].min() + 12 * STEP)
    live = windows.join(stored, on=["series", "window_start"], how="anti")
    HistoryStore(settings).write_checkpoint("seed", 0, stored, Progress(0, None))
    # the scoring state is saved (and offsets committed) after every batch, so the kill lands between saves
    env = {**test_env, "ROLLCAST_WINDOW__LENGTH_MS": str(STEP), "ROLLCAST_MODEL__CONTEXT": str(L),
           "ROLLCAST_SCORING__CHECKPOINT_S": "0"}

    proc = start_rollcast("forecast", "--model-dir", str(model_dir), env=env, log=tmp_path / "f1.log")
    first, second = live.filter(pl.col("window_start") < live["window_start"].min() + 10 * STEP), None
    second = live.join(first, on=["series", "window_start"], how="anti")
    store = HistoryStore(settings)
    try:
        store.write_checkpoint("seed", 0, first, Progress(1, None))  # as ingest: store, then produce
        produce_windows(settings, first)
        expected_first = {(s, e) for s, e in first.select("series", "window_end").iter_rows()}
        collect_forecasts(settings, expected_first, 60)
        store.write_checkpoint("seed", 0, second, Progress(2, None))
        produce_windows(settings, second)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: some of `second` may be unforecast
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()

    proc = start_rollcast("forecast", "--model-dir", str(model_dir), "--exit-when-idle", "3",
                          env=env, log=tmp_path / "f2.log")
    try:
        ref = offline(model_dir, windows)
        expected = {k for k in ref if k[1] > stored["window_end"].max()}
        seen = collect_forecasts(settings, expected, 60)
        last = windows["window_end"].max()
        scored = {k for k in expected if k[1] + H * STEP <= last}
        scores = collect_scores(settings, scored, 60)
        assert proc.wait(60) == 0, (tmp_path / "f2.log").read_text()[-2000:]
        flagged = offline_anomalies(seen, windows)
        assert ("b", spike_at) in flagged
        anomalies = collect_anomalies(settings, set(flagged), 60)  # the job has exited: all of them are there
    finally:
        if proc.poll() is None:
            proc.kill()
    for key in expected:
        for msg in seen[key]:  # repeats after the restart carry the same values
            got = [p["mean"] for p in msg["points"]]
            np.testing.assert_allclose(got, ref[key], rtol=1e-5, atol=1e-5)
            assert msg["model"]["version"] == "local" and msg["step_ms"] == STEP
            assert msg["points"][0]["ts"] == key[1]
    gap_series_skips = {k for k in ref if k[0] == "a"}
    assert gap_series_skips  # the gap row is forward-filled, so "a" is forecast too
    # the scores: one per forecast whose windows all closed, none missing after the kill, repeats identical,
    # equal to an offline computation from the forecast messages and the windows
    for key, msgs in seen.items():  # served (calibrated) quantiles repeat exactly too
        assert all(m["points"] == msgs[0]["points"] for m in msgs), key
    # anomalies: exactly the actuals outside the served 98% interval of the forecast one window before,
    # none missing after the kill, repeats identical
    assert set(anomalies) == set(flagged)
    for key, msgs in anomalies.items():
        assert all(m == msgs[0] for m in msgs), key
        assert msgs[0]["side"] == flagged[key] and msgs[0]["level"] == 0.98 and msgs[0]["tail_probability"] < 0.02
    assert set(scores) == scored
    want = offline_scores({k: seen[k][0] for k in scored}, windows, season=24)
    abs_err, inside, n = 0.0, 0, 0
    for key, msgs in scores.items():
        assert all(m == msgs[0] for m in msgs), key  # a repeat after the restart carries the same values
        got = as_score(msgs[0])  # the errors the message's values give, as every reader derives them
        assert got is not None and msgs[0]["format"] == 2 and len(got["actual"]) == len(want[key])
        for h, w in enumerate(want[key]):
            if w is None:
                assert got["actual"][h] is None
                continue
            assert got["abs_error"][h] == pytest.approx(w["abs_error"], abs=1e-5)
            assert got["naive_abs_error"][h] == pytest.approx(w["naive_abs_error"], abs=1e-5)
            pinball = {f"{q:g}": v for q, v in zip(got["quantiles"], got["pinball"][h], strict=True)}
            assert pinball == pytest.approx(w["pinball"], abs=1e-5)
            assert (got["inside"][h], got["model_inside"][h]) == (w["inside"], w["model_inside"])
            abs_err, inside, n = abs_err + got["abs_error"][h], inside + got["inside"][h], n + 1
    live = LiveAccuracy(1000)
    for msgs in scores.values():
        live.add_message(msgs[0])
    offline_mae = sum(p["abs_error"] for pts in want.values() for p in pts if p) / n
    offline_cov = sum(p["inside"] for pts in want.values() for p in pts if p) / n
    assert live.totals("local").mae == pytest.approx(offline_mae, rel=1e-6) == abs_err / n
    assert live.totals("local").coverage == pytest.approx(offline_cov) == inside / n


@pytest.mark.slow
def test_an_independent_kafka_client_reads_forecasts_as_json(
    settings: Settings, test_env: dict[str, str], model_dir: Path, tmp_path: Path
) -> None:
    """aiokafka (its own implementation of the Kafka protocol, not kafka-python) reads the topic.

    Debian's kcat was the first choice, but its librdkafka cannot parse this tansu build's
    ApiVersions v3 response ("Read underflow"), so it cannot talk to the test broker at all.
    """
    windows = make_windows(["x"], L + 2)
    env = {**test_env, "ROLLCAST_WINDOW__LENGTH_MS": str(STEP)}
    proc = start_rollcast("forecast", "--model-dir", str(model_dir), "--exit-when-idle", "3",
                          env=env, log=tmp_path / "f.log")
    try:
        produce_windows(settings, windows)
        collect_forecasts(settings, {("x", int(windows["window_end"].max()))}, 60)
    finally:
        proc.terminate()
        proc.wait(30)

    async def read(n: int) -> list:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(settings.topics.forecasts, bootstrap_servers=settings.kafka.bootstrap_servers,
                                    auto_offset_reset="earliest", group_id=None)
        await consumer.start()
        try:
            return [await asyncio.wait_for(consumer.getone(), 30) for _ in range(n)]
        finally:
            await consumer.stop()

    records = asyncio.run(read(3))  # windows L, L+1, L+2 have a full context
    for rec in records:
        msg = json.loads(rec.value)
        assert rec.key.decode() == msg["series"] == "x"
        assert set(msg) == {"series", "issued_at", "last_window_end", "model", "step_ms", "calibrated", "points"}
        assert msg["calibrated"] is True  # the default: served quantiles calibrated, the model's own kept
        assert len(msg["points"]) == H and set(msg["points"][0]["quantiles"]) == {f"{q:g}" for q in QUANTILES}
        assert set(msg["points"][0]["model_quantiles"]) == {f"{q:g}" for q in QUANTILES}
    assert sorted(json.loads(r.value)["last_window_end"] for r in records) == windows["window_end"].to_list()[-3:]


@pytest.mark.slow
def test_query_prints_the_latest_forecast(settings: Settings, test_env: dict[str, str], model_dir: Path,
                                          tmp_path: Path) -> None:
    windows = make_windows(["q1", "q2"], L + 3)
    HistoryStore(settings).write_checkpoint("seed", 0, windows, Progress(1, None))
    env = {**test_env, "ROLLCAST_WINDOW__LENGTH_MS": str(STEP)}
    proc = start_rollcast("forecast", "--model-dir", str(model_dir), "--exit-when-idle", "3",
                          env=env, log=tmp_path / "f.log")
    last = int(windows["window_end"].max())
    try:
        produce_windows(settings, windows)
        collect_forecasts(settings, {("q1", last), ("q2", last)}, 60)
    finally:
        proc.terminate()
        proc.wait(30)
    ref = offline(model_dir, windows)

    r = rollcast("query", "q1", "q2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    msgs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [m["series"] for m in msgs] == ["q1", "q2"]
    for m in msgs:
        assert m["last_window_end"] == last  # the newest, not the first one read
        np.testing.assert_allclose([p["mean"] for p in m["points"]], ref[(m["series"], last)], rtol=1e-5)

    r = rollcast("query", "q1", "nope", "--plot", str(tmp_path / "plot.png"), env=env)
    png = tmp_path / "plot-q1.png"  # one file per series when several are asked for
    assert r.returncode == 0, r.stderr
    assert "q1 — model tcn vlocal" in r.stdout and "nope: no forecast yet" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    r = rollcast("query", "nope", env=env)
    assert r.returncode == 1 and "no forecast yet" in r.stdout


@pytest.mark.slow
def test_a_new_champion_is_picked_up_without_restart(
    settings: Settings, test_env: dict[str, str], mlflow_server: str, tmp_path: Path
) -> None:
    from models.train.cycle import run_cycle
    from tests.support.train import HOUR_MS, WEAK, drifting_daily_windows, train_env, write_windows

    env = {**train_env(mlflow_server, Path(test_env["ROLLCAST_DATA_DIR"]), **WEAK), **test_env,
           "ROLLCAST_FORECAST__CHAMPION_POLL_S": "1"}
    env.pop("ROLLCAST_KAFKA__CLIENT")  # WEAK's SASL user is for redaction tests; the broker has no SASL
    from pipeline.config import load_settings

    s = load_settings(env=env)
    windows = drifting_daily_windows(820)
    t_live = int(windows["window_start"].min()) + 800 * HOUR_MS
    # gaps in the first live context of sensor-1 (L = 48 windows): its first window, one inside, and the
    # live window itself
    gaps = (pl.col("series") == "sensor-1") & pl.col("window_start").is_in(
        [t_live - 47 * HOUR_MS, t_live - 5 * HOUR_MS, t_live])
    aggregates = ["first", "last", "min", "max", "mean", "sum"]
    windows = windows.with_columns(
        pl.when(gaps).then(0).otherwise(pl.col("count")).alias("count"),
        *(pl.when(gaps).then(None).otherwise(pl.col(c)).alias(c) for c in aggregates),
    )
    write_windows(s, windows.filter(pl.col("window_start") < t_live))
    first = run_cycle(s)
    assert first.promoted == "1"

    proc = start_rollcast("forecast", env=env, log=tmp_path / "forecast.log")
    try:
        def send(hour: int) -> set[tuple[str, int]]:
            w = windows.filter(pl.col("window_start") == t_live + hour * HOUR_MS)
            write_windows(s, w)  # as ingest does: store first, then the topic
            produce_windows(s, w)
            return {(a, e) for a, e in w.select("series", "window_end").iter_rows()}

        seen = collect_forecasts(s, send(0), 120)
        assert {m["model"]["version"] for msgs in seen.values() for m in msgs} == {"1"}
        # one gap rule: the champion loaded through MLflow's pyfunc forecasts the same windows, gaps
        # included, exactly as the live job did
        import mlflow

        L = s.model.context
        recent = windows.filter(pl.col("window_start") <= t_live).sort("series", "window_start") \
            .group_by("series", maintain_order=True).tail(L)
        frame = recent.select("series", "window_end", pl.when(pl.col("count") > 0).then(pl.col("mean"))
                              .otherwise(float("nan")).alias("value")).to_pandas()
        assert frame["value"].isna().sum() == 3  # the three gaps are in the context
        mlflow.set_tracking_uri(mlflow_server)
        offline = mlflow.pyfunc.load_model(f"models:/{s.mlflow.registered_model}@champion").predict(frame)
        for name, rows in offline.groupby("series"):
            (live,) = seen[(name, t_live + HOUR_MS)]
            np.testing.assert_allclose([p["mean"] for p in live["points"]], rows["mean"], rtol=1e-5, atol=1e-6)
            # the model's own quantiles (served ones are calibrated from the first forecast, from the
            # version's holdout offsets: they already differ from the model's own)
            assert live["calibrated"] is True
            assert any(p["quantiles"] != p["model_quantiles"] for p in live["points"])
            for q in ("0.1", "0.9"):
                np.testing.assert_allclose([p["model_quantiles"][q] for p in live["points"]], rows[f"q{q}"],
                                           rtol=1e-5, atol=1e-6)
        assert set(offline["series"]) == {"sensor-0", "sensor-1", "sensor-2"}

        second = run_cycle(s.replace(**{"model.types": ["tcn"], "model.max_epochs": 3}))
        assert second.promoted == "2", second.candidates[0].decision

        def version_two_served() -> bool:
            keys = send(version_two_served.hour)
            version_two_served.hour += 1
            got = collect_forecasts(s, keys, 60)
            return all(m["model"]["version"] == "2" for k in keys for m in got[k])

        version_two_served.hour = 1
        wait_for(version_two_served, 90, "forecasts from version 2", interval=0.5)
        assert proc.poll() is None  # the same process, never restarted
        assert "champion moved" in (tmp_path / "forecast.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_a_malformed_windows_message_is_skipped_not_fatal(
    settings: Settings, test_env: dict[str, str], model_dir: Path, tmp_path: Path
) -> None:
    windows = make_windows(["m"], L + 1)
    env = {**test_env, "ROLLCAST_WINDOW__LENGTH_MS": str(STEP)}
    proc = start_rollcast("forecast", "--model-dir", str(model_dir), env=env, log=tmp_path / "f.log")
    try:
        producer = make_producer(settings)
        producer.send(settings.topics.windows, b"not arrow at all", partition=0, headers=HEADERS).get(30)
        producer.close()
        produce_windows(settings, windows)
        collect_forecasts(settings, {("m", int(windows["window_end"].max()))}, 60)
        assert proc.poll() is None
        assert "skipping an undecodable message" in (tmp_path / "f.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


