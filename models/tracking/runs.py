"""Logging a training cycle to MLflow: each candidate's run (params, metrics, plots, the pyfunc model),
its registered version and the tags both carry (names in :mod:`models.tracking.tags`)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.tracking.client import mlflow_errors, reachable, register
from models.tracking.tags import (
    CHAMPION_HOLDOUT_MAE,
    CODE_VERSION_TAG,
    CYCLE_KIND_TAG,
    CYCLE_TAG,
    DATA_END_MS_TAG,
    DATA_START_MS_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HOLDOUT_MAE,
    HOLDOUT_REL_MAE,
    MODEL_ARTIFACT,
    MODEL_TYPE_TAG,
    PARENT_VERSION_TAG,
    PROMOTION_TAG,
    RUN_CODE_VERSION_TAG,
    RUN_CYCLE_TAG,
    RUN_INCOMPLETE_TAG,
    RUN_MODEL_TYPE_TAG,
    SEASONAL_NAIVE_HOLDOUT_MAE,
    SERVING_ARTIFACT,
    VALIDATION_REASON_TAG,
    VALIDATION_TAG,
    WARM_CYCLES_TAG,
)
from pipeline.config import Settings

if TYPE_CHECKING:
    from models.train.backtest import BacktestResult
    from models.train.cycle import CycleData, Span
    from models.train.selection import Candidate

__all__ = [
    "PYFUNC_MODEL_FILE", "iso", "code_version", "run_params", "validation_status", "version_tags",
    "lineage_tags", "input_example", "publish", "ensure_experiment", "mark_incomplete",
]

REPO = Path(__file__).resolve().parents[2]
PYFUNC_MODEL_FILE = Path(__file__).resolve().with_name("pyfunc.py")


def iso(ms: int) -> str:
    """Epoch milliseconds as ``YYYY-MM-DDTHH:MM:SSZ``."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def code_version() -> str:
    """The git commit of the checkout (``+dirty`` if modified), else the installed package version."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "rollcast " + version("rollcast")
        except PackageNotFoundError:
            return "unknown"


def run_params(settings: Settings, cand: Candidate, span: Span) -> dict[str, Any]:
    """Everything a run was configured with, flattened; no Kafka or other secrets."""
    params: dict[str, Any] = {"model_type": cand.model_type}
    params.update({f"model.{k}": v for k, v in cand.model.config.to_dict().items()})
    params.update({f"train.{k}": v for k, v in settings.train.model_dump().items()})
    params.update({"max_epochs": settings.model.max_epochs, "batch_size": settings.model.batch_size,
                   "season": settings.model.season, "window.length_ms": settings.window.length_ms,
                   "window.target": settings.window.target})
    params.update(span.as_params())
    return {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in params.items()}


def validation_status(cand: Candidate) -> str:
    return "failed" if cand.failure else "passed"


def version_tags(cand: Candidate, span: Span, cycle_id: str) -> dict[str, str]:
    """The tags of a registered version: what it is, what it was trained on, and whether it may serve."""

    tags = {
        MODEL_TYPE_TAG: cand.model_type,
        CYCLE_TAG: cycle_id,
        CODE_VERSION_TAG: code_version(),
        "data_start": iso(span.start_ms),
        "data_end": iso(span.end_ms),
        DATA_START_MS_TAG: str(span.start_ms),
        DATA_END_MS_TAG: str(span.end_ms),
        VALIDATION_TAG: validation_status(cand),
        PROMOTION_TAG: cand.decision,
        **lineage_tags(cand),
    }
    if cand.failure:
        tags[VALIDATION_REASON_TAG] = cand.failure
    for k in (HOLDOUT_MAE, "holdout_rmse", "holdout_smape", "holdout_mase", "holdout_coverage",
              HOLDOUT_REL_MAE, CHAMPION_HOLDOUT_MAE, SEASONAL_NAIVE_HOLDOUT_MAE):
        if k in cand.metrics:
            tags[k] = f"{cand.metrics[k]:.6g}"
    return tags


def lineage_tags(cand: Candidate) -> dict[str, str]:
    """Whether ``cand`` was trained from scratch or fine-tuned, and from which version."""
    tags = {CYCLE_KIND_TAG: cand.cycle_kind, WARM_CYCLES_TAG: str(cand.warm_cycles)}
    if cand.parent_version is not None:
        tags[PARENT_VERSION_TAG] = cand.parent_version
    return tags


def input_example(cand: Candidate, data: CycleData, settings: Settings) -> tuple[Any, Any]:
    """A pyfunc input frame (the last ``context`` windows of two series) and its forecasts."""
    import pandas as pd

    from models import predict
    from models.tracking.pyfunc import forecast_frame, frame_to_context

    m = data.matrix
    L = cand.model.config.context
    rows = []
    for s, name in enumerate(m.series[:2]):
        for t in range(m.values.shape[1] - L, m.values.shape[1]):
            rows.append({"series": name, "window_end": int(m.window_end_ms[t]), "value": float(m.values[s, t])})
    frame = pd.DataFrame(rows).astype({"series": str, "window_end": "int64", "value": "float64"})
    names, ends, ctx = frame_to_context(frame, L)
    preds = predict(cand.model, ctx, window_end_ms=ends)
    out = forecast_frame(names, ends[:, -1], preds, list(cand.model.config.quantiles), settings.window.length_ms)
    return frame, out


def publish(settings: Settings, cand: Candidate, data: CycleData, others: dict[str, BacktestResult],
            cycle_id: str, incomplete_runs: list[str], trigger: dict[str, str] | None = None) -> None:
    """Log one run with everything, then register its model as a new version (never half-done).

    ``trigger``: what started the cycle (:data:`TRIGGER_TAG` and its figures), tags of both.
    A retry after a failed registration registers the already complete run
    instead of logging it again.
    """
    if cand.model_uri is None:
        _log_run(settings, cand, data, others, cycle_id, incomplete_runs, trigger or {})
    assert cand.run_id is not None and cand.model_uri is not None
    tags = {**version_tags(cand, data.span, cycle_id), **(trigger or {})}
    cand.version = register(settings, cand.model_uri, cand.run_id, tags, model_id=cand.model_id)


def ensure_experiment(settings: Settings) -> Any:
    """Set (create if needed) ``mlflow.experiment`` as the active experiment, tagged as model development
    (:data:`EXPERIMENT_KIND_TAG`) if it is not tagged yet (an experiment created by an older rollcast, or
    by hand; a kind someone chose is left alone); returns it."""
    import mlflow

    with mlflow_errors(settings, f"setting the experiment {settings.mlflow.experiment}"):
        experiment = mlflow.set_experiment(settings.mlflow.experiment)
        if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment


def _log_run(settings: Settings, cand: Candidate, data: CycleData, others: dict[str, BacktestResult],
             cycle_id: str, incomplete_runs: list[str], trigger: dict[str, str]) -> None:
    """One finished run with params, metrics, plots and the pyfunc model; sets ``cand.model_uri``."""
    import mlflow

    from models import save_model

    experiment = ensure_experiment(settings)
    with mlflow_errors(settings, f"logging the {cand.model_type} run"):
        run = mlflow.start_run(
            experiment_id=experiment.experiment_id,
            run_name=f"{cand.model_type}-{cycle_id}",
            tags={RUN_CYCLE_TAG: cycle_id, RUN_MODEL_TYPE_TAG: cand.model_type,
                  RUN_CODE_VERSION_TAG: code_version(), VALIDATION_TAG: validation_status(cand),
                  **lineage_tags(cand), **trigger},
        )
    run_id = run.info.run_id
    incomplete_runs.append(run_id)
    try:
        with mlflow_errors(settings, f"logging the {cand.model_type} run"), \
                tempfile.TemporaryDirectory(prefix="rollcast-train-") as tmp:
            tmpdir = Path(tmp)
            mlflow.log_params(run_params(settings, cand, data.span))
            client = mlflow.MlflowClient()
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            epoch_metrics = [Metric("train_loss", v, now, i) for i, v in enumerate(cand.train_loss)]
            epoch_metrics += [Metric("val_loss", v, now, i) for i, v in enumerate(cand.val_loss)]
            for i in range(0, len(epoch_metrics), 900):
                client.log_batch(run_id, metrics=epoch_metrics[i : i + 900])
            mlflow.log_metrics({**cand.metrics, "train_seconds": cand.train_seconds,
                                "epochs": float(len(cand.train_loss))})
            if cand.failure:
                mlflow.set_tag(VALIDATION_REASON_TAG, cand.failure)
            mlflow.set_tag(PROMOTION_TAG, cand.decision)
            plots = tmpdir / "plots"
            plots.mkdir()
            from models.plots import plot_forecasts, plot_losses

            plot_losses(cand, plots / "loss.png")
            plot_forecasts(cand, data, others, plots)
            mlflow.log_artifacts(str(plots), artifact_path="plots")
            # config.json, weights.pt, calibration.json (the holdout's split-conformal offsets) and, when the
            # exporter can make it, the ONNX graph serving runs (models.compiled): all in the version's artifacts
            saved = save_model(cand.model, tmpdir / "model")
            if cand.calibration is not None:  # the forecast job starts its calibration from these
                text = cand.calibration.to_json()
                (saved / cand.calibration.FILE).write_text(text)
                mlflow.log_text(text, f"calibration/{cand.calibration.FILE}")
            serving = tmpdir / "serving.json"
            serving.write_text(json.dumps({
                "step_ms": settings.window.length_ms,
                "target": settings.window.target,
                "model_type": cand.model_type,
                "normalisation": {"per_window": cand.model.config.normalise, "eps": cand.model.config.eps},
                "input_columns": ["series", "window_end", "value"],
            }, indent=2))
            example, example_out = input_example(cand, data, settings)
            from mlflow.models import infer_signature

            with warnings.catch_warnings():
                # window_end, step and ts are int64 epoch ms / step numbers: never missing
                warnings.filterwarnings("ignore", ".*integer column.*", UserWarning)
                signature = infer_signature(example, example_out)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={MODEL_ARTIFACT: str(saved), SERVING_ARTIFACT: str(serving)},
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
            )
            mlflow.end_run("FINISHED")
        incomplete_runs.remove(run_id)
    except BaseException:
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")  # pops the active run even when the server is down
        raise
    cand.run_id, cand.model_uri, cand.model_id = run_id, info.model_uri, info.model_id


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("rollcast", "torch", "pytorch-lightning", "mlflow", "numpy", "pandas", "polars", "onnxruntime"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def mark_incomplete(settings: Settings, run_ids: list[str]) -> None:
    """Mark runs a failed attempt left open as FAILED (best effort, when MLflow is back)."""
    if not run_ids or not reachable(settings):
        return
    import mlflow

    client = mlflow.MlflowClient()
    for run_id in list(run_ids):
        with contextlib.suppress(Exception):
            client.set_tag(run_id, RUN_INCOMPLETE_TAG, "true")
            client.set_terminated(run_id, "FAILED")
            run_ids.remove(run_id)
