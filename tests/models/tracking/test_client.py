"""The MLflow client against a real MLflow server: register, promote, resolve and download the champion,
read a version's holdout figures back, log live metrics; an unreachable server is MlflowUnavailable."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

import models
from models import tracking
from models.registry import config_from_settings
from models.tracking.tags import (
    HOLDOUT_MAE,
    HOLDOUT_REL_MAE,
    MODEL_ARTIFACT,
    MODEL_TYPE_TAG,
    SEASONAL_NAIVE_HOLDOUT_MAE,
    SERVING_ARTIFACT,
    UI_WORKFLOW,
    VALIDATION_REASON_TAG,
    VALIDATION_TAG,
)
from pipeline.config import Settings
from pipeline.errors import MlflowUnavailable, PromotionRefused
from pipeline.processes import free_port
from tests.support.train import train_settings


def log_forecaster(s: Settings, metrics: dict[str, float] | None = None) -> tuple[str, str, str, models.ForecastModel]:
    """Log an untrained tiny forecaster as a pyfunc model, as a training run does: (run id, model URI,
    model id, the model)."""
    model = models.create_model("tcn", **config_from_settings(s.model, "tcn"))
    experiment = tracking.ensure_experiment(s)
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run, tempfile.TemporaryDirectory() as tmp:
        saved = models.save_model(model, Path(tmp) / "model")
        serving = Path(tmp) / "serving.json"
        serving.write_text(json.dumps({"step_ms": s.window.length_ms}))
        if metrics:
            mlflow.log_metrics(metrics)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(tracking.PYFUNC_MODEL_FILE), pip_requirements=["rollcast"],
            artifacts={MODEL_ARTIFACT: str(saved), SERVING_ARTIFACT: str(serving)},
        )
    return run.info.run_id, info.model_uri, info.model_id, model


@pytest.fixture
def s(mlflow_server: str, tmp_path: Path) -> Settings:
    settings = train_settings(mlflow_server, tmp_path / "data")
    tracking.configure(settings)
    return settings


def test_a_validated_version_becomes_champion_and_is_downloaded_once(s: Settings) -> None:
    assert tracking.champion_version(s) is None and tracking.latest_version(s) is None
    assert tracking.champion(s) is None
    run_id, uri, model_id, model = log_forecaster(s)

    failed = tracking.register(s, uri, run_id, {VALIDATION_TAG: "failed", VALIDATION_REASON_TAG: "non-finite loss"},
                               model_id=model_id)
    assert failed == "1"
    with pytest.raises(PromotionRefused, match="non-finite loss"):
        tracking.promote(s, failed)
    assert tracking.champion_version(s) is None

    passed = tracking.register(s, uri, run_id, {VALIDATION_TAG: "passed", MODEL_TYPE_TAG: "tcn"}, model_id=model_id)
    assert passed == "2" and tracking.latest_version(s).version == "2"
    assert tracking.champion_version(s) is None  # registered, not promoted
    tracking.promote(s, passed)
    found = tracking.champion_version(s)
    assert found.version == "2" and found.tags[MODEL_TYPE_TAG] == "tcn" and found.run_id == run_id
    assert tracking.version_run_id(s, "2") == run_id

    version, model_dir = tracking.champion(s)
    assert version == "2" and (model_dir / "weights.pt").is_file() and (model_dir / "config.json").is_file()
    assert model_dir.is_relative_to(tracking.cache_dir(s) / "2")
    ctx = np.random.default_rng(0).normal(size=(2, s.model.context)).astype(np.float32)
    np.testing.assert_allclose(models.predict(models.load_model(model_dir), ctx), models.predict(model, ctx))
    # cached: the second call finds the files and downloads nothing (no temporary directory left behind)
    assert tracking.download_version(s, "2") == model_dir
    assert [p.name for p in tracking.cache_dir(s).iterdir()] == ["2"]


def test_holdout_relative_mae_comes_from_the_tags_the_run_or_the_mae_ratio(s: Settings) -> None:
    client = MlflowClient(s.mlflow.tracking_uri)
    with_metric, uri, model_id, _ = log_forecaster(s, metrics={HOLDOUT_REL_MAE: 0.4})
    experiment = tracking.ensure_experiment(s)
    bare = client.create_run(experiment.experiment_id).info.run_id
    client.set_terminated(bare)
    name = s.mlflow.registered_model

    def version(run_id: str, tags: dict[str, str]):
        return client.get_model_version(name, tracking.register(s, uri, run_id, tags, model_id=model_id))

    assert tracking.holdout_relative_mae(s, version(bare, {HOLDOUT_REL_MAE: "0.25"})) == pytest.approx(0.25)
    assert tracking.holdout_relative_mae(s, version(with_metric, {})) == pytest.approx(0.4)
    ratio = version(bare, {HOLDOUT_MAE: "0.5", SEASONAL_NAIVE_HOLDOUT_MAE: "2"})
    assert tracking.holdout_relative_mae(s, ratio) == pytest.approx(0.25)
    assert tracking.holdout_relative_mae(s, version(bare, {HOLDOUT_MAE: "0.5"})) is None


def test_live_metrics_go_to_the_run_at_their_step(s: Settings) -> None:
    experiment = tracking.ensure_experiment(s)
    client = MlflowClient(s.mlflow.tracking_uri)
    run_id = client.create_run(experiment.experiment_id).info.run_id
    tracking.log_live_metrics(s, run_id, {"live_mae": 1.5, "live_points": 10}, step=7)
    tracking.log_live_metrics(s, run_id, {"live_mae": 1.25, "live_points": 12}, step=8)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "live_mae")] == [(7, 1.5), (8, 1.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "live_points")] == [(7, 10.0), (8, 12.0)]


def test_experiment_url_opens_the_experiment_on_its_training_runs(s: Settings) -> None:
    base = s.mlflow.tracking_uri.rstrip("/")
    assert tracking.experiment_url(s) == f"{base}/#/experiments?{UI_WORKFLOW}"  # no experiment yet
    experiment = tracking.ensure_experiment(s)
    assert tracking.experiment_url(s) == f"{base}/#/experiments/{experiment.experiment_id}?{UI_WORKFLOW}"


def test_an_error_is_mlflow_unavailable_only_while_the_server_is_down(s: Settings, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a bad request"), tracking.mlflow_errors(s, "testing"):
        raise ValueError("a bad request")
    down = train_settings(f"http://127.0.0.1:{free_port()}", tmp_path / "down")
    assert not tracking.reachable(down)
    with pytest.raises(MlflowUnavailable, match="unreachable while testing: ConnectionError"), \
            tracking.mlflow_errors(down, "testing"):
        raise ConnectionError("refused")
