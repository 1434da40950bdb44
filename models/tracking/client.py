"""The MLflow client: the tracking server and the registry (versions, the ``champion`` alias, a local
cache of downloaded versions), and what the live monitor reads from and logs to a version's run. Tag
names are in :mod:`models.tracking.tags`, a training cycle's logging in :mod:`models.tracking.runs`,
the forecast job's champion watcher in :mod:`models.serving.watcher`.

The train job logs every model as a version of ``mlflow.registered_model``
(:func:`models.tracking.runs.publish`, through :func:`register`) and moves the alias with
:func:`promote`; the forecast job serves the version that carries ``mlflow.champion_alias``::

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
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.tracking.tags import (
    HOLDOUT_MAE,
    HOLDOUT_REL_MAE,
    MODEL_ARTIFACT,
    SEASONAL_NAIVE_HOLDOUT_MAE,
    UI_WORKFLOW,
    VALIDATION_REASON_TAG,
    VALIDATION_TAG,
)
from pipeline.config import Settings, require_tracking_uri
from pipeline.errors import MlflowUnavailable, PromotionRefused
from pipeline.runtime import http_ok

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

__all__ = [
    "configure", "reachable", "mlflow_errors", "champion_version", "latest_version", "experiment_url",
    "cache_dir", "download_version", "artifact_path", "champion", "register", "promote",
    "holdout_relative_mae", "version_run_id", "log_live_metrics",
]

log = logging.getLogger("rollcast.registry")


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


def holdout_relative_mae(settings: Settings, mv: ModelVersion, client: MlflowClient | None = None) -> float | None:
    """A version's holdout MAE relative to seasonal naive's (run metric ``holdout_rel_mae_seasonal_naive``;
    the version's tags for versions whose tags carry it, or the ratio of their MAE tags); None if unknown."""
    tags = mv.tags or {}
    with contextlib.suppress(ValueError):
        if HOLDOUT_REL_MAE in tags:
            return float(tags[HOLDOUT_REL_MAE])
    if mv.run_id:
        client = client or configure(settings)
        with mlflow_errors(settings, f"reading the run of version {mv.version}"):
            value = client.get_run(mv.run_id).data.metrics.get(HOLDOUT_REL_MAE)
        if value is not None:
            return float(value)
    with contextlib.suppress(KeyError, ValueError, ZeroDivisionError):
        return float(tags[HOLDOUT_MAE]) / float(tags[SEASONAL_NAIVE_HOLDOUT_MAE])
    return None


def version_run_id(settings: Settings, version: str, client: MlflowClient | None = None) -> str | None:
    """The training run of ``version`` of ``mlflow.registered_model``."""
    client = client or configure(settings)
    with mlflow_errors(settings, f"looking up version {version}"):
        return client.get_model_version(settings.mlflow.registered_model, str(version)).run_id or None


def log_live_metrics(settings: Settings, run_id: str, values: dict[str, float], step: int,
                     client: MlflowClient | None = None) -> None:
    """Log a version's live metrics (``live_*``, :mod:`models.scoring.drift`) to its training run, at ``step``."""
    from mlflow.entities import Metric

    client = client or configure(settings)
    now = int(time.time() * 1000)
    with mlflow_errors(settings, f"logging live metrics to run {run_id}"):
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in values.items()])
