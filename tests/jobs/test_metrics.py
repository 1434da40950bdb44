"""/metrics and /healthz of running ingest and forecast jobs: the counters move as data flows."""

from __future__ import annotations

from pathlib import Path

import pytest

import models
from models.scoring.accuracy import LiveAccuracy
from pipeline import processes
from pipeline.config import load_settings
from tests.support import healthz, metric, wait_for
from tests.support.forecast import STEP, H, L, collect_scores, make_windows, produce_windows
from tests.support.ingest import INGEST_ENV, make_observations, produce, start_forecast, start_ingest

pytestmark = pytest.mark.slow


def test_ingest_metrics_move_with_the_data(settings, test_env, tmp_path: Path) -> None:
    s = load_settings(env={**test_env, **INGEST_ENV})
    port = processes.free_port()
    ingest = start_ingest(test_env, tmp_path, "ingest", port)
    try:
        wait_for(lambda: healthz(port)[0] == 200, 60, "ingest /healthz 200")
        assert metric(port, "rollcast_ingest_messages_total") == 0
        produce(s, make_observations(3000, series=4, seed=41))
        wait_for(lambda: metric(port, "rollcast_ingest_messages_total") >= 3000, 60, "3000 messages counted")
        wait_for(lambda: metric(port, "rollcast_ingest_windows_closed_total") > 0, 30, "windows closed")
        assert metric(port, "rollcast_ingest_observations_total") > 2900
        assert metric(port, "rollcast_ingest_rejected_total", reason="late") > 0  # the generator makes some late
        assert metric(port, "rollcast_ingest_checkpoints_total") > 0
        # lag per partition, from the fetch responses' high-water marks: caught up means 0
        wait_for(lambda: metric(port, "rollcast_ingest_consumer_lag", partition="0") == 0
                 and metric(port, "rollcast_ingest_consumer_lag", partition="1") == 0, 30, "lag 0 on both partitions")
        code, body = healthz(port)
        assert code == 200 and body["job"] == "ingest" and body["problems"] == []
    finally:
        assert ingest.stop(30) == 0, ingest.tail(30)


def test_forecast_metrics_move_with_the_data(settings, test_env, tmp_path: Path) -> None:
    model_dir = models.save_model(models.create_model("tcn", context=L, horizon=H, seed=3), tmp_path / "model")
    port = processes.free_port()
    forecast = start_forecast(test_env, tmp_path, "forecast", port, model_dir)
    try:
        wait_for(lambda: healthz(port)[0] == 200, 90, "forecast /healthz 200")
        assert metric(port, "rollcast_forecast_forecasts_total") == 0
        windows = make_windows(["m1", "m2"], L + 5)
        produce_windows(settings, windows)
        n = 2 * 6  # windows L..L+5 of each series have a full context
        wait_for(lambda: metric(port, "rollcast_forecast_forecasts_total") >= n, 60, f"{n} forecasts counted")
        assert metric(port, "rollcast_forecast_windows_total") == windows.height
        assert metric(port, "rollcast_forecast_inference_seconds_count") >= 1
        assert metric(port, "rollcast_forecast_end_to_end_seconds_count") >= 1
        assert metric(port, "rollcast_forecast_model_version") == -1  # a local model directory, not a version
        wait_for(lambda: sum(metric(port, "rollcast_forecast_consumer_lag", partition=str(p)) for p in (0, 1)) == 0
                 and healthz(port)[1].get("model") == "tcn", 30, "lag 0 and the model on /healthz")
        # forecasts from windows L..L+2 have all H windows closed: scored; the live gauges are their figures
        last = windows["window_end"].max()
        scored = {(s, e) for s, e in windows.select("series", "window_end").iter_rows() if e + H * STEP <= last}
        scored = {k for k in scored if k[1] >= windows["window_end"].min() + (L - 1) * STEP}
        assert len(scored) == 2 * 3
        scores = collect_scores(settings, scored, 60)
        live = LiveAccuracy(1000)
        for msgs in scores.values():
            live.add_message(msgs[0])
        want = live.totals("local")
        wait_for(lambda: metric(port, "rollcast_forecast_scores_total") >= 6, 30, "6 scores counted")
        assert metric(port, "rollcast_live_points", version="local") == want.points == 6 * H
        assert metric(port, "rollcast_live_mae", version="local") == pytest.approx(want.mae)
        assert metric(port, "rollcast_live_relative_mae", version="local") == pytest.approx(want.relative_mae)
        assert metric(port, "rollcast_live_coverage", version="local") == pytest.approx(want.coverage)
        assert metric(port, "rollcast_live_model_coverage", version="local") == pytest.approx(want.model_coverage)
    finally:
        assert forecast.stop(30) == 0, forecast.tail(30)
