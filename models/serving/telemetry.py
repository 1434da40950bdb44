"""Prometheus metrics of the forecast job, as module-level objects.

They live in prometheus-client's default registry (``REGISTRY``), so the job
exposes them all with its metrics server (:func:`pipeline.observability.serve_http`).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

__all__ = [
    "REGISTRY",
    "FORECASTS",
    "WINDOWS_IN",
    "END_TO_END_S",
    "MODEL_VERSION",
    "MLFLOW_UP",
    "BATCH_WAITS",
    "LAG",
    "SCORES",
    "ANOMALIES",
    "LIVE",
    "SKIPPED",
    "INFERENCE_S",
    "STAGE_S",
    "SERIES",
]

FORECASTS = Counter("rollcast_forecast_forecasts_total", "Forecast messages produced")
WINDOWS_IN = Counter("rollcast_forecast_windows_total", "Windows consumed from the windows topic")
END_TO_END_S = Histogram(
    "rollcast_forecast_end_to_end_seconds",
    "From a window message's broker timestamp until its forecast is acknowledged",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_VERSION = Gauge("rollcast_forecast_model_version", "Registered model version in use (0: none)")
MLFLOW_UP = Gauge("rollcast_forecast_mlflow_reachable", "1 if the last champion check reached MLflow")
BATCH_WAITS = Counter(
    "rollcast_forecast_batch_waits_total",
    "Polls whose windows batch announced partitions not yet fetched, by outcome: complete (the rest came "
    "within forecast.batch_wait_ms) or timeout (forecast without them; they follow as another batch)",
    ["outcome"],
)
LAG = Gauge("rollcast_forecast_consumer_lag", "Windows messages behind the partition's end", ["partition"])
ANOMALIES = Counter("rollcast_forecast_anomalies_total",
                    "Settled actuals outside the served anomalies.level interval (messages on topics.anomalies)")
SCORES = Counter("rollcast_forecast_scores_total", "Score messages produced (forecasts whose windows all closed)")
LIVE = {
    name: Gauge(f"rollcast_live_{name}", f"{what}, over the forecasts issued in the last scoring.live_windows "
                "windows, by model version", ["version"])
    for name, what in [
        ("mae", "Live MAE of the point forecast"),
        ("relative_mae", "Live MAE relative to seasonal naive on the same windows (< 1: better)"),
        ("coverage", "Live share of actuals inside the served outer interval (calibrated when calibration is on)"),
        ("model_coverage", "Live share of actuals inside the model's own outer interval"),
        ("points", "Scored forecast steps"),
    ]
}

# what the Forecaster (models.serving.forecaster) counts and times inside a batch
SKIPPED = Counter("rollcast_forecast_skipped_total", "Windows not forecast, by reason", ["reason"])
INFERENCE_S = Histogram(
    "rollcast_forecast_inference_seconds", "Batched inference time per batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
STAGE_S = Histogram(
    "rollcast_forecast_stage_seconds",
    "Time per batch in each stage: arrival (from the oldest window message's timestamp until the job "
    "starts on the batch), decode (windows into buffers), context, inference, messages (JSON), send "
    "(until the broker acknowledged them all), commit",
    ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
SERIES = Gauge("rollcast_forecast_series", "Series held in memory")
