"""Every MLflow call rollcast makes: the registry (versions, the ``champion`` alias, a local cache), the
training runs (params, metrics, plots, the pyfunc model), the tags they carry, and the champion watcher
of the forecast job.

The train job logs every model as a version of ``mlflow.registered_model``
(:func:`publish`); the forecast job serves the version that carries
``mlflow.champion_alias``::

    found = champion(settings)            # None while no version is promoted
    if found is not None:
        version, model_dir = found        # model_dir holds weights.pt + the JSON config
        model = models.load_model(model_dir)

A version's files are downloaded once into ``<data_dir>/models/<name>/<version>``
and reused afterwards, so polling the alias costs one request.

Every function here turns a failure to reach the tracking server into
:class:`~pipeline.errors.MlflowUnavailable`; other MLflow errors (a bad name, a
missing version) propagate as they are. mlflow is imported inside functions so
that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings, require_tracking_uri
from pipeline.errors import MlflowUnavailable, PromotionRefused
from pipeline.runtime import http_ok

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from models.backtest import BacktestResult
    from models.cycle import CycleData, Span
    from models.selection import Candidate
    from models.serving import LoadedModel

log = logging.getLogger("rollcast.registry")

# Inside a logged pyfunc model: the saved forecaster (weights.pt + config) and serving settings.
MODEL_ARTIFACT = "model"
SERVING_ARTIFACT = "serving"

REPO = Path(__file__).resolve().parents[1]
PYFUNC_MODEL_FILE = Path(__file__).resolve().with_name("pyfunc.py")

# Tags of registered versions (and of runs, where they say the same)
VALIDATION_TAG = "validation_status"  # "passed" or "failed"; only a passed version is ever promoted
VALIDATION_REASON_TAG = "validation_reason"
PROMOTION_TAG = "promotion"  # the decision of the cycle, in words
MODEL_TYPE_TAG = "model_type"
CYCLE_TAG = "cycle_id"
CODE_VERSION_TAG = "code_version"
DATA_START_MS_TAG = "data_start_ms"
DATA_END_MS_TAG = "data_end_ms"  # the training schedule goes on from the newest version's data end
CYCLE_KIND_TAG = "cycle_kind"  # CYCLE_FULL (trained from scratch) or CYCLE_WARM (fine-tuned from its parent)
PARENT_VERSION_TAG = "parent_version"  # the champion version a warm cycle fine-tuned; absent for a full one
WARM_CYCLES_TAG = "warm_cycles"  # warm cycles in a row up to this one since the last full retrain (0: full)
CYCLE_FULL = "full"
CYCLE_WARM = "warm"
# Tags of runs only
RUN_CYCLE_TAG = "rollcast.cycle_id"
RUN_MODEL_TYPE_TAG = "rollcast.model_type"
RUN_CODE_VERSION_TAG = "rollcast.code_version"
RUN_INCOMPLETE_TAG = "rollcast.incomplete"
# What started a cycle, on its runs and versions: TRIGGER_* (plus rollcast.trigger_reason, in words, and
# for a drift cycle the figures, rollcast.drift.*: models.live.Drift.tags)
TRIGGER_TAG = "rollcast.trigger"
TRIGGER_REASON_TAG = "rollcast.trigger_reason"
TRIGGER_SCHEDULE = "schedule"  # train.every_minutes passed, or the start-up cycle
TRIGGER_WINDOWS = "windows"  # train.after_windows new windows
TRIGGER_DRIFT = "drift"  # the champion's live accuracy (models.live)
TRIGGER_MANUAL = "manual"  # `rollcast train --once`
# MLflow 3's UI (3.1-3.16) opens an experiment on the page of its kind; without the tag it guesses, and
# shows the GenAI overview (traces, tokens). rollcast's runs are model development.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI ignores that tag: a "GenAI / Model training" switch picks the page, from the URL's
# ``workflowType`` or else the browser's last choice (GenAI at first). The links rollcast prints set it.
UI_WORKFLOW = "workflowType=machine_learning"


def configure(settings: Settings) -> MlflowClient:
    """Point mlflow at ``mlflow.tracking_uri`` and return a client.

    MLflow's HTTP client retries a refused connection for minutes by default;
    rollcast retries whole cycles itself (``train.max_retries``), so requests
    here give up after ``mlflow.connect_timeout_s``. Explicit ``MLFLOW_HTTP_*``
    variables in the environment still win.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = require_tracking_uri(settings)
    timeout = max(1, int(settings.mlflow.connect_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def reachable(settings: Settings) -> bool:
    """True if the tracking server answers its health check (always True for a non-HTTP store)."""
    uri = require_tracking_uri(settings)
    if not uri.startswith(("http://", "https://")):
        return True
    return http_ok(uri.rstrip("/") + "/health", timeout=min(5.0, settings.mlflow.connect_timeout_s))


@contextlib.contextmanager
def mlflow_errors(settings: Settings, doing: str) -> Iterator[None]:
    """Re-raise an error inside the block as :class:`MlflowUnavailable` when the server is down.

    An error while the server is up is a real one (a bad request, a bug) and
    propagates unchanged.
    """
    try:
        yield
    except MlflowUnavailable:
        raise
    except Exception as e:
        if reachable(settings):
            raise
        raise MlflowUnavailable(
            f"MLflow at {settings.mlflow.tracking_uri} is unreachable while {doing}: "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from e


def champion_version(settings: Settings, client: MlflowClient | None = None) -> ModelVersion | None:
    """The version carrying ``mlflow.champion_alias``, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    client = client or configure(settings)
    name, alias = settings.mlflow.registered_model, settings.mlflow.champion_alias
    with mlflow_errors(settings, f"resolving {name}@{alias}"):
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            missing_alias = e.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(e).lower()
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or missing_alias:
                return None
            raise


def latest_version(settings: Settings, client: MlflowClient | None = None) -> ModelVersion | None:
    """The newest version of ``mlflow.registered_model`` (the last training cycle's), or None."""
    client = client or configure(settings)
    name = settings.mlflow.registered_model
    with mlflow_errors(settings, f"looking up the newest version of {name}"):
        found = client.search_model_versions(f"name='{name}'", max_results=1, order_by=["version_number DESC"])
    return found[0] if found else None


def experiment_url(settings: Settings) -> str:
    """The MLflow UI's page of ``mlflow.experiment``, opened on its training runs (the experiments list
    when the experiment does not exist yet or MLflow does not answer)."""
    uri = require_tracking_uri(settings).rstrip("/")
    page = "experiments"
    try:
        experiment = configure(settings).get_experiment_by_name(settings.mlflow.experiment)
        if experiment is not None:
            page = f"experiments/{experiment.experiment_id}"
    except Exception as e:  # noqa: BLE001 - a link to print: the list page will do
        log.debug("cannot look up the experiment %s: %s", settings.mlflow.experiment, e)
    return f"{uri}/#/{page}?{UI_WORKFLOW}"


def cache_dir(settings: Settings) -> Path:
    """Where downloaded versions of the registered model are kept."""
    return settings.data_dir / "models" / settings.mlflow.registered_model


def download_version(settings: Settings, version: str) -> Path:
    """Download a version's saved forecaster once; return the directory ``models.load_model`` reads."""
    import mlflow

    configure(settings)
    name = settings.mlflow.registered_model
    final = cache_dir(settings) / str(version)
    if not (final / "MLmodel").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{version}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with mlflow_errors(settings, f"downloading {name} version {version}"):
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "MLmodel").is_file():  # not a concurrent download of the same version
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return artifact_path(final, MODEL_ARTIFACT)


def artifact_path(pyfunc_dir: Path, key: str) -> Path:
    """Local path of pyfunc artifact ``key`` inside a downloaded model directory."""
    from mlflow.models import Model

    flavor = Model.load(str(pyfunc_dir / "MLmodel")).flavors["python_function"]
    return pyfunc_dir / flavor["artifacts"][key]["path"]


def champion(settings: Settings) -> tuple[str, Path] | None:
    """``(version, model_dir)`` of the current champion, or None if no version carries the alias.

    ``model_dir`` is a local directory for ``models.load_model``; it is
    downloaded on first use and cached under ``data_dir``. Raises
    :class:`MlflowUnavailable` when the tracking server cannot be reached.
    """
    found = champion_version(settings)
    if found is None:
        return None
    return str(found.version), download_version(settings, str(found.version))


def register(
    settings: Settings,
    model_uri: str,
    run_id: str,
    tags: dict[str, Any],
    model_id: str | None = None,
    client: MlflowClient | None = None,
) -> str:
    """Create a new version of ``mlflow.registered_model`` from a complete logged model.

    The version and all its tags are created in one request, so a version is
    never visible half-tagged. Returns the version number as a string.
    """
    from mlflow.exceptions import MlflowException

    client = client or configure(settings)
    name = settings.mlflow.registered_model
    with mlflow_errors(settings, f"registering a version of {name}"):
        try:
            client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            with contextlib.suppress(MlflowException):  # a concurrent creator is fine
                client.create_registered_model(
                    name, description="rollcast forecasters; the serving one carries the alias "
                    f"'{settings.mlflow.champion_alias}'"
                )
        mv = client.create_model_version(
            name,
            source=model_uri,
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
            model_id=model_id,
        )
    log.info("registered %s version %s (run %s)", name, mv.version, run_id)
    return str(mv.version)


def promote(settings: Settings, version: str, client: MlflowClient | None = None) -> None:
    """Move ``mlflow.champion_alias`` to ``version`` (which must be complete and validated)."""
    client = client or configure(settings)
    name, alias = settings.mlflow.registered_model, settings.mlflow.champion_alias
    with mlflow_errors(settings, f"moving {name}@{alias} to version {version}"):
        mv = client.get_model_version(name, version)
        if mv.tags.get(VALIDATION_TAG) != "passed":
            raise PromotionRefused(
                f"{name} version {version} did not pass validation "
                f"({mv.tags.get(VALIDATION_REASON_TAG, 'no validation tag')}); not promoting it"
            )
        client.set_registered_model_alias(name, alias, str(version))
    log.info("%s@%s -> version %s", name, alias, version)


# --------------------------------------------------------------------------- training runs

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
    from models.cycle import iso

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
    for k in ("holdout_mae", "holdout_rmse", "holdout_smape", "holdout_mase", "holdout_coverage",
              "holdout_rel_mae_seasonal_naive", "champion_holdout_mae", "seasonal_naive_holdout_mae"):
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
    from models.pyfunc import forecast_frame, frame_to_context

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
            saved = save_model(cand.model, tmpdir / "model")
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
    for dist in ("rollcast", "torch", "pytorch-lightning", "mlflow", "numpy", "pandas", "polars"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def holdout_relative_mae(settings: Settings, mv: ModelVersion, client: MlflowClient | None = None) -> float | None:
    """A version's holdout MAE relative to seasonal naive's (run metric ``holdout_rel_mae_seasonal_naive``;
    the version's tags for versions whose tags carry it, or the ratio of their MAE tags); None if unknown."""
    tags = mv.tags or {}
    with contextlib.suppress(ValueError):
        if "holdout_rel_mae_seasonal_naive" in tags:
            return float(tags["holdout_rel_mae_seasonal_naive"])
    if mv.run_id:
        client = client or configure(settings)
        with mlflow_errors(settings, f"reading the run of version {mv.version}"):
            value = client.get_run(mv.run_id).data.metrics.get("holdout_rel_mae_seasonal_naive")
        if value is not None:
            return float(value)
    with contextlib.suppress(KeyError, ValueError, ZeroDivisionError):
        return float(tags["holdout_mae"]) / float(tags["seasonal_naive_holdout_mae"])
    return None


def version_run_id(settings: Settings, version: str, client: MlflowClient | None = None) -> str | None:
    """The training run of ``version`` of ``mlflow.registered_model``."""
    client = client or configure(settings)
    with mlflow_errors(settings, f"looking up version {version}"):
        return client.get_model_version(settings.mlflow.registered_model, str(version)).run_id or None


def log_live_metrics(settings: Settings, run_id: str, values: dict[str, float], step: int,
                     client: MlflowClient | None = None) -> None:
    """Log a version's live metrics (``live_*``, :mod:`models.live`) to its training run, at ``step``."""
    from mlflow.entities import Metric

    client = client or configure(settings)
    now = int(time.time() * 1000)
    with mlflow_errors(settings, f"logging live metrics to run {run_id}"):
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in values.items()])


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


# --------------------------------------------------------------------------- serving


def wait_for_champion(settings: Settings, shutdown: threading.Event, health: Any,
                      on_reachable: Callable[[bool], Any] = lambda up: None) -> LoadedModel | None:
    """Block until the registered model has a champion (None if asked to shut down first).

    ``on_reachable(up)`` is told after every look-up whether MLflow answered."""
    from models.serving import load_saved_model

    said, down = False, False
    while not shutdown.is_set():
        try:
            found = champion(settings)
            on_reachable(True)
            down = False
        except MlflowUnavailable as e:  # say so (once per outage) and keep waiting
            on_reachable(False)
            if not down:
                log.warning("MLflow unreachable while looking for a champion: %s", e)
            down, found = True, None
        if found is not None:
            version, model_dir = found
            return load_saved_model(model_dir, version)
        if not said:
            log.info("no %r alias on %s yet; waiting for the first promoted model",
                     settings.mlflow.champion_alias, settings.mlflow.registered_model)
            said = True
        health.facts["waiting_for"] = "champion"
        health.polled()
        time.sleep(min(settings.forecast.champion_poll_s, 2.0))
    return None


class ChampionWatcher:
    """Watches the champion alias in a background thread, so MLflow never blocks the consume loop.

    Every ``forecast.champion_poll_s`` it resolves the alias; when it has moved, it downloads
    and loads the new version off the loop and leaves it for :meth:`take`, which the loop calls
    between batches. While MLflow is unreachable it backs off (up to 30 s), logs one warning
    per outage and one line when MLflow is back, and the loop keeps serving the model it has.
    """

    def __init__(self, settings: Settings, current: LoadedModel,
                 on_reachable: Callable[[bool], Any] = lambda up: None):
        self.settings = settings
        self.on_reachable = on_reachable
        self.version = current.version
        self._pending: LoadedModel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)

    def start(self) -> ChampionWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> LoadedModel | None:
        """The new champion, loaded, if the alias moved since the last call."""
        with self._lock:
            model, self._pending = self._pending, None
        return model

    def _run(self) -> None:
        from models.serving import load_saved_model

        poll = self.settings.forecast.champion_poll_s
        wait, down_since = poll, None
        while not self._stop.wait(wait):
            try:
                found = champion(self.settings)
            except MlflowUnavailable as e:
                self.on_reachable(False)
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("MLflow unreachable (%s); still serving version %s", e, self.version)
                wait = min(max(wait * 2, 1.0), 30.0)
                continue
            self.on_reachable(True)
            if down_since is not None:
                log.info("MLflow reachable again after %.0fs", time.monotonic() - down_since)
                down_since = None
            wait = poll
            if found is None or found[0] == self.version:
                continue
            version, model_dir = found
            model = load_saved_model(model_dir, version)
            log.info("champion moved: version %s -> %s (%s)", self.version, version, model.name)
            with self._lock:
                self._pending = model
            self.version = version
