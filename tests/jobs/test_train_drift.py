"""Retraining on drift: the train job reads the scores topic, starts a ``drift`` cycle when the champion's
live accuracy falls off, and logs live metrics to the versions' MLflow runs (a real broker, a real
MLflow server, the real train job as a process).

In the tests here the score messages are produced by the test itself (scripted, in the format of
pipeline/scores_io.py), not by the forecast job: they say exactly how bad the champion is live, so the
trigger's figures can be checked. The end-to-end test with the forecast job's own scores is in
test_pipeline_drift (below, ``test_a_level_shift_...``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from models.live import LiveMonitor
from pipeline.config import Settings, load_settings
from pipeline.kafka import ensure_topics, make_admin, make_producer
from pipeline.scores_io import encode_scores
from tests.jobs.train_helpers import HOUR_MS, WEAK, drifting_daily_windows, train_env, write_windows
from tests.support import start_rollcast, wait_for

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
    log = tmp_path / "train.log"
    proc = start_rollcast("train", "--every-minutes", "60", "--poll-s", "30", env=env, log=log)
    try:
        wait_for(lambda: "champion -> version 1" in log.read_text(), 180, "the start-up cycle to promote version 1")
        cycle_end = time.monotonic()
        v1 = client.get_model_version(name, "1")
        assert v1.tags["rollcast.trigger"] == "schedule"
        assert v1.tags["rollcast.trigger_reason"] == "start-up (no version yet)"
        assert client.get_run(v1.run_id).data.tags["rollcast.trigger"] == "schedule"
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
