"""A training cycle's runs and versions: the tags a version carries (names from models.tracking.tags), the
experiment, and runs a failed attempt left open (against the real MLflow server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

import models
from models import tracking
from models.registry import config_from_settings
from models.tracking.tags import (
    CHAMPION_HOLDOUT_MAE,
    CODE_VERSION_TAG,
    CYCLE_FULL,
    CYCLE_KIND_TAG,
    CYCLE_TAG,
    CYCLE_WARM,
    DATA_END_MS_TAG,
    DATA_START_MS_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HOLDOUT_MAE,
    HOLDOUT_REL_MAE,
    MODEL_TYPE_TAG,
    PARENT_VERSION_TAG,
    PROMOTION_TAG,
    RUN_INCOMPLETE_TAG,
    VALIDATION_REASON_TAG,
    VALIDATION_TAG,
    WARM_CYCLES_TAG,
)
from models.train.cycle import Span
from models.train.selection import Candidate
from pipeline.config import Settings
from tests.support.train import HOUR_MS, WEAK, drifting_daily_windows, train_settings, write_windows

SPAN = Span(start_ms=0, end_ms=800 * HOUR_MS, series=3, windows=2400, train_windows=600, val_windows=60,
            holdout_windows=48)


def candidate(s: Settings, **kw) -> Candidate:
    config = config_from_settings(s.model, "tcn")
    metrics = {HOLDOUT_MAE: 0.123456789, HOLDOUT_REL_MAE: 0.5, CHAMPION_HOLDOUT_MAE: 0.2}
    return Candidate("tcn", config, models.create_model("tcn", **config), [1.0], [1.0], metrics, None, 1.0,
                     decision="promoted", **kw)


def test_iso_is_utc_to_the_second() -> None:
    assert tracking.iso(0) == "1970-01-01T00:00:00Z"
    assert tracking.iso(1_700_000_000_999) == "2023-11-14T22:13:20Z"


def test_a_version_says_what_it_is_what_it_was_trained_on_and_whether_it_may_serve(tmp_path: Path) -> None:
    s = train_settings("http://127.0.0.1:1", tmp_path)
    tags = tracking.version_tags(candidate(s), SPAN, "cycle-1")
    assert tags[MODEL_TYPE_TAG] == "tcn" and tags[CYCLE_TAG] == "cycle-1" and tags[CODE_VERSION_TAG]
    assert tags[DATA_START_MS_TAG] == "0" and tags[DATA_END_MS_TAG] == str(800 * HOUR_MS)
    assert tags["data_start"] == "1970-01-01T00:00:00Z" and tags["data_end"] == "1970-02-03T08:00:00Z"
    assert tags[VALIDATION_TAG] == "passed" and VALIDATION_REASON_TAG not in tags
    assert tags[PROMOTION_TAG] == "promoted"
    assert tags[HOLDOUT_MAE] == "0.123457" and tags[HOLDOUT_REL_MAE] == "0.5" and tags[CHAMPION_HOLDOUT_MAE] == "0.2"
    assert "holdout_rmse" not in tags  # only the metrics the candidate has
    assert tags[CYCLE_KIND_TAG] == CYCLE_FULL and tags[WARM_CYCLES_TAG] == "0" and PARENT_VERSION_TAG not in tags

    failed = tracking.version_tags(candidate(s, failure="non-finite loss: train_loss[0]=nan"), SPAN, "cycle-1")
    assert failed[VALIDATION_TAG] == "failed" and failed[VALIDATION_REASON_TAG].startswith("non-finite loss")
    warm = tracking.lineage_tags(candidate(s, cycle_kind=CYCLE_WARM, parent_version="4", warm_cycles=2))
    assert warm == {CYCLE_KIND_TAG: CYCLE_WARM, WARM_CYCLES_TAG: "2", PARENT_VERSION_TAG: "4"}


def test_run_params_flatten_the_model_the_training_settings_and_the_span(tmp_path: Path) -> None:
    s = train_settings("http://127.0.0.1:1", tmp_path)
    params = tracking.run_params(s, candidate(s), SPAN)
    assert params["model_type"] == "tcn" and params["model.context"] == 48 and params["train.holdout_windows"] == 48
    assert json.loads(params["model.quantiles"]) == [0.01, 0.1, 0.5, 0.9, 0.99]  # lists as JSON
    assert params["data_end_ms"] == 800 * HOUR_MS and params["data_series"] == 3
    assert params["window.length_ms"] == HOUR_MS and params["window.target"] == "mean"


def test_the_experiment_is_tagged_as_model_development_unless_someone_chose_a_kind(
    mlflow_server: str, tmp_path: Path
) -> None:
    s = train_settings(mlflow_server, tmp_path)
    tracking.configure(s)
    experiment = tracking.ensure_experiment(s)
    assert experiment.name == s.mlflow.experiment
    client = MlflowClient(mlflow_server)
    assert client.get_experiment(experiment.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    assert tracking.ensure_experiment(s).experiment_id == experiment.experiment_id
    assert client.get_experiment(experiment.experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_runs_a_failed_attempt_left_open_are_marked_failed_once_mlflow_answers(
    mlflow_server: str, tmp_path: Path
) -> None:
    s = train_settings(mlflow_server, tmp_path)
    tracking.configure(s)
    experiment = tracking.ensure_experiment(s)
    client = MlflowClient(mlflow_server)
    open_runs = [client.create_run(experiment.experiment_id).info.run_id for _ in range(2)]
    left = list(open_runs)

    down = train_settings("http://127.0.0.1:1", tmp_path)
    tracking.mark_incomplete(down, left)  # MLflow does not answer: kept for the next attempt
    assert left == open_runs

    tracking.mark_incomplete(s, left)
    assert left == []
    for run_id in open_runs:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags[RUN_INCOMPLETE_TAG] == "true"


@pytest.mark.parametrize("dirty", [False, True])
def test_code_version_names_the_commit(dirty: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    def fake_run(cmd, **kw):
        out = "abc123def456\n" if "rev-parse" in cmd else (" M models/x.py\n" if dirty else "")
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert tracking.code_version() == "abc123def456" + ("+dirty" if dirty else "")


@pytest.mark.slow
def test_a_version_carries_its_onnx_graph_and_serving_and_pyfunc_run_it(mlflow_server: str, tmp_path: Path) -> None:
    """The graph save_model writes is logged in the version's artifacts: the forecast job's download
    serves it in ONNX Runtime, and so does the pyfunc model."""
    import mlflow

    from models.compiled import ONNX_FILE, ONNXRUNTIME
    from models.serving.forecaster import load_saved_model
    from models.tracking.runs import _requirements
    from models.train.cycle import run_cycle

    s = train_settings(mlflow_server, tmp_path / "data", **WEAK)
    write_windows(s, drifting_daily_windows(800))
    assert run_cycle(s).promoted == "1"
    version, model_dir = tracking.champion(s)
    assert (model_dir / ONNX_FILE).is_file()
    assert load_saved_model(model_dir, version).runtime == ONNXRUNTIME
    pyfunc = mlflow.pyfunc.load_model(f"models:/{s.mlflow.registered_model}@{s.mlflow.champion_alias}")
    assert pyfunc.unwrap_python_model().compiled is not None
    assert any(r.startswith("onnxruntime==") for r in _requirements())  # what the pyfunc model installs
