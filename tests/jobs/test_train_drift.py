"""Retraining on drift: the train job reads the scores topic, starts a ``drift`` cycle when the champion's
live accuracy falls off, and logs live metrics to the versions' MLflow runs (a real broker, a real
MLflow server, the real train job as a process).

In the tests here the score messages are produced by the test itself (scripted, in the format of
pipeline/scores_io.py), not by the forecast job: they say exactly how bad the champion is live, so the
trigger's figures can be checked. The last test is the whole loop with the forecast job's own scores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient

from models.scoring.accuracy import LiveAccuracy
from models.scoring.drift import LiveMonitor
from pipeline.config import Settings, load_settings
from pipeline.kafka.clients import ensure_topics, make_admin, make_producer
from pipeline.scores_io import decode_score, encode_scores
from pipeline.store import HistoryStore, Progress
from tests.support import read_topic, start_rollcast, wait_for
from tests.support.train import HOUR_MS, WEAK, drifting_daily_windows, train_env, write_windows

H = 12  # model.horizon of train_env


def score_messages(version: str, series: list[str], first_end_ms: int, windows: int, abs_error: float,
                   naive_abs_error: float, inside: bool = True) -> list[tuple[str, bytes]]:
    """One score message per series and issuing window, every one of its H points with these errors."""
    rows = []
    for w in range(windows):
        end = first_end_ms + w * HOUR_MS
        points = [{"h": h, "ts": end + (h - 1) * HOUR_MS, "actual": 20.0, "forecast": 20.0 + abs_error,
                   "abs_error": abs_error, "sq_error": abs_error**2, "pinball": {"0.5": abs_error / 2},
                   "inside": inside, "model_inside": inside, "naive": 20.0 + naive_abs_error,
                   "naive_abs_error": naive_abs_error} for h in range(1, H + 1)]
        rows += [{"series": s, "last_window_end": end, "model": {"name": "tcn", "version": version},
                  "issued_at": int(time.time() * 1000), "step_ms": HOUR_MS, "calibrated": True,
                  "quantiles": [0.1, 0.5, 0.9], "points": points} for s in series]
    return encode_scores(rows)


def produce(s: Settings, messages: list[tuple[str, bytes]]) -> None:
    producer = make_producer(s)
    for key, value in messages:
        producer.send(s.topics.scores, value, key=key.encode())
    producer.flush()
    producer.close()


def drift_env(broker: str, mlflow_server: str, data_dir: Path, **extra: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return train_env(mlflow_server, data_dir, **{
        **WEAK,
        "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": broker,
        "ROLLCAST_KAFKA__PARTITIONS": "2",
        "ROLLCAST_TOPICS__SCORES": f"scores-{suffix}",
        "ROLLCAST_GROUPS__SCORES": f"train-scores-{suffix}",
        "ROLLCAST_TRAIN__DRIFT_WINDOWS": "12",
        "ROLLCAST_TRAIN__DRIFT_MIN_POINTS": "100",
        "ROLLCAST_TRAIN__DRIFT_FACTOR": "1.5",
        "ROLLCAST_TRAIN__DRIFT_COVERAGE_FLOOR": "0.65",
        "ROLLCAST_TRAIN__LIVE_LOG_S": "1",
        **extra,
    })


def stop_job(proc) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait()


def delete_topic(s: Settings) -> None:
    admin = make_admin(s)
    try:
        admin.delete_topics([s.topics.scores])
    except Exception:  # noqa: BLE001 - cleanup
        pass
    finally:
        admin.close()


@pytest.mark.slow
def test_a_champion_worse_live_starts_a_drift_cycle_after_the_cooldown_and_its_live_metrics_reach_mlflow(
        broker: str, mlflow_server: str, tmp_path: Path) -> None:
    """Scripted scores (produced by this test) say version 1 is 4x worse than seasonal naive live; its
    holdout relative MAE is below 1, so 4 > holdout x 1.5. The job trains every 60 minutes and polls its
    schedule every 30 s: only the drift trigger can start the next cycle, and it does so once the 15 s
    cooldown since the start-up cycle has passed, not before, and within a few seconds after."""
    cooldown_s = 15.0
    env = drift_env(broker, mlflow_server, tmp_path / "data",
                    ROLLCAST_TRAIN__DRIFT_COOLDOWN_MINUTES=str(cooldown_s / 60))
    s = load_settings(env=env)
    history = drifting_daily_windows(800)
    write_windows(s, history)
    ensure_topics(s, [s.topics.scores])
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    name = s.mlflow.registered_model
    experiment_id = client.create_experiment(s.mlflow.experiment)  # as an older rollcast left it: no kind
    log = tmp_path / "train.log"
    proc = start_rollcast("train", "--every-minutes", "60", "--poll-s", "30", env=env, log=log)
    try:
        wait_for(lambda: "champion -> version 1" in log.read_text(), 180, "the start-up cycle to promote version 1")
        cycle_end = time.monotonic()
        v1 = client.get_model_version(name, "1")
        assert v1.tags["rollcast.trigger"] == "schedule"
        assert v1.tags["rollcast.trigger_reason"] == "start-up (no version yet)"
        assert client.get_run(v1.run_id).data.tags["rollcast.trigger"] == "schedule"
        # the MLflow UI opens the experiment on its runs (test_mlflow_ui checks the page)
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
        holdout_rel = float(v1.tags["holdout_rel_mae_seasonal_naive"])
        assert holdout_rel * 1.5 < 4.0

        series = sorted(history["series"].unique().to_list())
        first_end = int(history["window_end"].max()) + HOUR_MS
        # a version that does not serve, worse still: kept for MLflow, never judged
        produce(s, score_messages("7", series, first_end, 12, abs_error=9.0, naive_abs_error=1.0, inside=False))
        # the champion: 3 series x 12 windows x 12 points = 432 points, relative MAE 4, coverage 1
        produce(s, score_messages("1", series, first_end, 12, abs_error=2.0, naive_abs_error=0.5))

        # (b) live metrics on version 1's run, step = the newest scored window's index
        newest = first_end + 11 * HOUR_MS
        hist = wait_for(lambda: client.get_metric_history(v1.run_id, "live_relative_mae"), 30,
                        "live metrics on version 1's run")
        assert hist[-1].value == pytest.approx(4.0) and hist[-1].step == newest // HOUR_MS
        metrics = client.get_run(v1.run_id).data.metrics
        assert metrics["live_mae"] == pytest.approx(2.0) and metrics["live_points"] == 432
        assert metrics["live_coverage"] == 1.0 and metrics["live_model_coverage"] == 1.0
        assert "holdout_mae" in metrics  # next to the holdout metrics of the same run

        # (a) the drift cycle: not within the cooldown, promptly after it
        wait_for(lambda: "training cycle: drift of version 1" in log.read_text(), cooldown_s + 15,
                 "a drift cycle after the cooldown")
        waited = time.monotonic() - cycle_end
        assert cooldown_s - 1 <= waited <= cooldown_s + 8, waited
        text = log.read_text()
        assert "drift of version 7" not in text
        assert re.search(r"live relative MAE 4 > holdout [0-9.]+ x 1.5 \(432 points in the last 12 windows\)", text)
        wait_for(lambda: len(client.search_model_versions(f"name='{name}'")) >= 2, 120, "version 2")
        v2 = client.get_model_version(name, "2")
        for tags in (v2.tags, client.get_run(v2.run_id).data.tags):
            assert tags["rollcast.trigger"] == "drift"
            assert tags["rollcast.drift.version"] == "1" and tags["rollcast.drift.points"] == "432"
            assert float(tags["rollcast.drift.live_relative_mae"]) == pytest.approx(4.0)
            assert float(tags["rollcast.drift.holdout_relative_mae"]) == pytest.approx(holdout_rel, rel=1e-4)
            assert tags["rollcast.drift.factor"] == "1.5" and tags["rollcast.drift.coverage_floor"] == "0.65"
            assert tags["rollcast.drift.live_coverage"] == "1" and tags["rollcast.drift.by"] == "relative_mae"
        # version 7 is no version of this model: its scores are not logged anywhere, and say so once
        assert text.count("live metrics of version 7 not logged") <= 1
    finally:
        stop_job(proc)
        delete_topic(s)
    assert "train job stopped" in log.read_text()


def test_the_monitor_judges_the_champion_on_its_own_scores_only(tmp_path: Path) -> None:
    """No Kafka: scores added to the monitor's sums directly."""
    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_TRAIN__DRIFT_WINDOWS": "12",
                           "ROLLCAST_TRAIN__DRIFT_MIN_POINTS": "100", "ROLLCAST_TRAIN__DRIFT_COOLDOWN_MINUTES": "0"})
    m = LiveMonitor(s, last_cycle=0.0)


    for _key, value in score_messages("1", ["a", "b", "c"], 0, 12, abs_error=2.0, naive_abs_error=0.5):
        m.live.add_message(json.loads(value))
    m._champion = ("1", 0.5)
    drift = m.drift()
    assert drift is not None and drift.version == "1" and drift.points == 432
    m._champion = ("2", 0.5)  # a new champion: the old one's scores do not count against it
    assert m.judgement() is None and m.drift() is None
    for _key, value in score_messages("2", ["a", "b", "c"], 12 * HOUR_MS, 3, abs_error=0.4, naive_abs_error=1.0):
        m.live.add_message(json.loads(value))
    judged = m.judgement()
    assert judged is not None and not judged.drifted and judged.live_relative_mae == pytest.approx(0.4)
    m.cycle_done()  # with a cooldown, nothing is due right after a cycle
    m._champion = ("1", 0.5)
    assert m.drift() is not None  # cooldown 0
    m.settings = s.replace(**{"train.drift_cooldown_minutes": 1.0})
    assert m.drift() is None


def shifted_windows(hours: int, shift_at: int, n_series: int = 3, seed: int = 1) -> pl.DataFrame:
    """:func:`drifting_daily_windows` until hour ``shift_at``; from then on each series follows a new
    daily profile (a random shape of +-15, repeated every day) on a level that goes on drifting (a random
    walk of 0.5 per hour from the last value), plus noise 0.3. The models trained before have never seen
    the profile and forecast far worse than seasonal naive; a model retrained on the new windows takes
    the profile from a day ago, as seasonal naive does, and corrects it by the level's drift since, as
    version 1 learned to on the old pattern, so it clearly beats seasonal naive (holdout relative MAE
    0.73 here). With a flat level instead, seasonal naive is nearly exact, no epoch beats the untrained
    model on validation, and the drift cycle's version is its seasonal-naive base itself: it tied with
    seasonal naive (0.99999994) and was promoted only by float rounding, which a data seed or a CPU
    could turn the other way."""
    before = drifting_daily_windows(hours, n_series)
    rng = np.random.default_rng(seed)
    out = []
    for _series, part in before.sort("window_start").group_by("series", maintain_order=True):
        y = part["mean"].to_numpy().copy()
        profile = rng.uniform(-15, 15, 24)
        t = np.arange(shift_at, hours)
        level = y[shift_at - 1] + np.cumsum(rng.normal(0, 0.5, t.size))
        y[shift_at:] = level + profile[t % 24] + rng.normal(0, 0.3, t.size)
        out.append(part.with_columns(*(pl.Series(c, y) for c in ("first", "last", "min", "max", "mean", "sum"))))
    return pl.concat(out).sort("series", "window_start")


@pytest.mark.slow
def test_a_new_daily_pattern_mid_stream_makes_the_train_job_retrain_and_live_accuracy_recover(
        settings: Settings, test_env: dict[str, str], mlflow_server: str, tmp_path: Path) -> None:
    """The whole loop with the forecast job's own scores: the test writes windows as ingest's checkpoint
    does (the history store, then the windows topic); the forecast job forecasts and scores them with
    champion version 1; from hour 800 the series follow a new daily pattern, version 1's live relative
    MAE soars, the train job starts a ``drift`` cycle, the new version is promoted, the forecast job
    swaps it in, and the new version's live relative MAE is far below version 1's.

    Training weighs the newest windows (``train.recency_half_life_windows`` 24), as a job that retrains
    on drift would: the drift cycle's span still holds 500 hours of the old pattern."""
    from tests.support.forecast import produce_windows

    env = {**test_env, **drift_env(settings.kafka.bootstrap_servers, mlflow_server, Path(test_env["ROLLCAST_DATA_DIR"]),
                                   ROLLCAST_TRAIN__DRIFT_WINDOWS="24", ROLLCAST_TRAIN__DRIFT_MIN_POINTS="200",
                                   ROLLCAST_TRAIN__DRIFT_COOLDOWN_MINUTES="0.2", ROLLCAST_TRAIN__FULL_EVERY="1",
                                   ROLLCAST_MODEL__MAX_EPOCHS="3", ROLLCAST_FORECAST__CHAMPION_POLL_S="1",
                                   ROLLCAST_SCORING__CHECKPOINT_S="1", ROLLCAST_TRAIN__RECENCY_HALF_LIFE_WINDOWS="24")}
    s = load_settings(env=env)
    ensure_topics(s, [s.topics.scores])
    windows = shifted_windows(1200, 800)
    t0 = int(windows["window_start"].min())
    part = [windows.filter((pl.col("window_start") >= t0 + a * HOUR_MS) & (pl.col("window_start") < t0 + b * HOUR_MS))
            for a, b in ((0, 800), (800, 1100), (1100, 1200))]
    store = HistoryStore(s)
    store.write_checkpoint("ingest", 0, part[0], Progress(1, int(part[0]["window_end"].max())))
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    name = s.mlflow.registered_model
    t_log, f_log = tmp_path / "train.log", tmp_path / "forecast.log"
    train = start_rollcast("train", "--every-minutes", "60", "--poll-s", "30", env=env, log=t_log)
    forecast = None
    try:
        wait_for(lambda: "champion -> version 1" in t_log.read_text(), 180, "the start-up cycle to promote version 1")
        forecast = start_rollcast("forecast", env=env, log=f_log)
        wait_for(lambda: "assigned partitions" in f_log.read_text(), 90, "the forecast job to start")
        store.write_checkpoint("ingest", 0, part[1], Progress(2, int(part[1]["window_end"].max())))
        produce_windows(s, part[1])
        wait_for(lambda: "training cycle: drift of version 1" in t_log.read_text(), 120, "a drift cycle")

        def promoted() -> list[str]:  # the train job's own "champion -> version N" lines, after version 1
            return [v for v in re.findall(r"^champion -> version (\d+)$", t_log.read_text(), re.M) if v != "1"]

        new = wait_for(promoted, 120, "a new champion")[0]
        v = client.get_model_version(name, new)
        assert v.tags["rollcast.trigger"] == "drift" and v.tags["rollcast.drift.version"] == "1"
        # Not the watcher's "champion moved: version 1 -> N": that comes when the new version is loaded,
        # before the loop swaps it in between batches; windows produced right after it can still be
        # polled in the loop's current iteration and forecast with version 1 (part[2] fits one batch:
        # then the new version never forecasts at all). After "serving version N", every batch is its.
        wait_for(lambda: f"serving version {new} (" in f_log.read_text(), 60,
                 "the forecast job to serve the new champion")
        store.write_checkpoint("ingest", 0, part[2], Progress(3, int(part[2]["window_end"].max())))
        produce_windows(s, part[2])
        live = LiveAccuracy(24)

        def judged() -> bool:
            for rec in read_topic(s, s.topics.scores, quiet_s=2.0, timeout=30):
                msg = decode_score(rec.value)
                if msg is not None:
                    live.add_message(msg)
            return live.totals(new).points >= 200

        try:
            wait_for(judged, 90, f"scores of version {new}", interval=1.0)
        except AssertionError as e:  # which versions forecast the windows produced after the swap
            after = {m["model"]["version"] for m in (json.loads(r.value) for r in read_topic(s, s.topics.forecasts))
                     if m["last_window_end"] > int(part[1]["window_end"].max())}
            raise AssertionError(f"{e}; the windows after the swap were forecast by versions {sorted(after)}") from None
    finally:
        for proc in (forecast, train):
            if proc is not None:
                stop_job(proc)
        delete_topic(s)
    old, now = live.totals("1"), live.totals(new)
    print(f"live relative MAE: version 1 {old.relative_mae:.3g} ({old.points} points), "
          f"version {new} {now.relative_mae:.3g} ({now.points} points)")
    assert old.relative_mae > 1.5 * float(client.get_model_version(name, "1").tags["holdout_rel_mae_seasonal_naive"])
    assert now.relative_mae < 0.5 * old.relative_mae
