"""Retrain the configured models on a schedule, version each in MLflow, and move `champion`.

A cycle reads the last train.span_windows windows per series from the history
store, splits them by time into train, validation and holdout (the last
train.holdout_windows windows, rounded down to whole horizons), trains every
type in model.types with Lightning, and scores on the holdout, at the same
rolling origins, the new model, the current champion and the seasonal-naive
baseline (the metrics of `rollcast backtest`). Each model gets one MLflow run
(config, per-epoch losses, holdout metrics, data span, plots) and one new
version of mlflow.registered_model, logged as a pyfunc model from code. The
alias mlflow.champion_alias moves to the best new version only if its holdout
MAE beats the seasonal-naive baseline and the champion's MAE by the relative
margin train.min_improvement; a version with a non-finite loss or metric is
tagged validation_status=failed and never promoted.

Cycles run every train.every_minutes, after train.after_windows new windows
reached the store, or on whichever comes first when both are set, counted
from the last cycle recorded in MLflow (the newest registered version and the
data it was trained on), so a restarted job does not retrain at once; with no
version yet the first cycle runs at start. If MLflow is unreachable a cycle is
retried train.max_retries times with exponential backoff (trained models are
kept, not retrained), and a failed cycle never touches the serving champion.
--once runs one cycle and exits (0 also when nothing was promoted).
SIGTERM or Ctrl-C stops training at the end of the current batch, abandons
the cycle, and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import Counter, Gauge

from pipeline.config import Settings
from pipeline.errors import ConfigError, MlflowUnavailable, NotEnoughData, StoreUnavailable

if TYPE_CHECKING:
    from models.backtest import BacktestResult
    from models.base import ForecastModel
    from models.data import SeriesMatrix

HELP = "retrain the models on a schedule, version them in MLflow, move the champion alias"
PYFUNC_MODEL_FILE = Path(__file__).resolve().with_name("pyfunc_model.py")
REPO = Path(__file__).resolve().parents[1]
PLOTTED_SERIES = 3

log = logging.getLogger("rollcast.train")

CYCLES = Counter("rollcast_train_cycles_total", "Training cycles by outcome", ["outcome"])
LAST_SUCCESS = Gauge("rollcast_train_last_success_timestamp_seconds", "End of the last successful cycle")
CHAMPION_VERSION = Gauge("rollcast_train_champion_version", "Registered version carrying the champion alias")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="run one cycle now and exit")
    parser.add_argument("--every-minutes", type=float, help="override train.every_minutes")
    parser.add_argument("--after-windows", type=int, help="override train.after_windows")
    parser.add_argument(
        "--poll-s", type=float, default=10.0, help="how often to check the schedule and the store (default: 10)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no training progress bar")


# --------------------------------------------------------------------------- cycle data


@dataclass(frozen=True)
class Span:
    """The slice of the history store one cycle trains and evaluates on."""

    start_ms: int  # first window_start read
    end_ms: int  # last window_end read
    series: int
    windows: int  # rows read
    train_windows: int  # time steps per series, each split
    val_windows: int
    holdout_windows: int

    def as_params(self) -> dict[str, Any]:
        return {
            "data_start_ms": self.start_ms,
            "data_end_ms": self.end_ms,
            "data_start": _iso(self.start_ms),
            "data_end": _iso(self.end_ms),
            "data_series": self.series,
            "data_windows": self.windows,
            "data_train_windows": self.train_windows,
            "data_val_windows": self.val_windows,
            "data_holdout_windows": self.holdout_windows,
        }


@dataclass
class CycleData:
    matrix: SeriesMatrix
    span: Span
    train_span: tuple[int, int]
    val_span: tuple[int, int]
    origins: np.ndarray  # rolling origins of the holdout, H apart


@dataclass
class Candidate:
    """One trained model of a cycle and what became of it."""

    model_type: str
    config: dict[str, Any]
    model: ForecastModel
    train_loss: list[float]
    val_loss: list[float]
    metrics: dict[str, float]  # holdout_*, champion_holdout_*, seasonal_naive_holdout_*, ...
    backtest: BacktestResult
    train_seconds: float
    failure: str | None = None  # why validation failed; None when it passed
    decision: str = ""
    run_id: str | None = None
    model_uri: str | None = None  # set once the run and its model are completely logged
    model_id: str | None = None
    version: str | None = None

    @property
    def mae(self) -> float:
        return self.metrics["holdout_mae"]


@dataclass
class CycleResult:
    cycle_id: str
    span: Span
    candidates: list[Candidate]
    champion_before: str | None
    promoted: str | None  # the version that now carries the alias, if it moved
    attempts: int = 1


@dataclass
class _Attempts:
    """What survives between attempts of one cycle: trained models, runs, registered versions."""

    data: CycleData | None = None
    candidates: list[Candidate] | None = None
    champion_version: str | None = None
    champion_eval: BacktestResult | None = None
    champion_note: str = ""
    incomplete_runs: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the cycle


def read_history(settings: Settings) -> tuple[Any, int, int]:
    """The last ``train.span_windows`` windows per series: (frame, first window_start, last window_end)."""
    from pipeline.store import HistoryStore

    store = HistoryStore(settings)
    ends = store.max_window_end()
    if not ends:
        raise NotEnoughData(
            f"the history store {store.location} is empty; run `rollcast ingest` "
            "(and `rollcast replay` a dataset) first"
        )
    end = max(ends.values())
    start = end - settings.train.span_windows * settings.window.length_ms
    frame = store.read(start_ms=start, end_ms=end)
    return frame, int(frame["window_start"].min()), end


def prepare_data(settings: Settings) -> CycleData:
    """Read the span and split it by time; :class:`NotEnoughData` when it is too short."""
    from models.backtest import origins_for
    from models.data import time_split, windows_to_matrix

    L, H = settings.model.context, settings.model.horizon
    frame, start_ms, end_ms = read_history(settings)
    matrix = windows_to_matrix(frame, settings.window.target)
    n_steps = matrix.values.shape[1]
    n_origins = settings.train.holdout_windows // H
    if n_origins < 1:
        raise ConfigError(
            [f"train.holdout_windows ({settings.train.holdout_windows}) must be at least "
             f"model.horizon ({H}) to evaluate one forecast"]
        )
    holdout = n_origins * H
    need = L + holdout + 2 * H
    if n_steps < need:
        raise NotEnoughData(
            f"the history store has {n_steps} windows per series in the last {settings.train.span_windows}; "
            f"training needs at least {need} (context {L} + horizon {H} + holdout {holdout} + a horizon of "
            "training targets); let more windows arrive or lower model.context, model.horizon or "
            "train.holdout_windows"
        )
    split = time_split(n_steps, L, H, settings.train.validation_fraction, holdout)
    origins = origins_for(n_steps, L, H, n_origins)
    span = Span(
        start_ms=start_ms,
        end_ms=end_ms,
        series=len(matrix.series),
        windows=frame.height,
        train_windows=split.train[1] - split.train[0],
        val_windows=split.val[1] - split.val[0],
        holdout_windows=holdout,
    )
    return CycleData(matrix, span, split.train, split.val, origins)


def model_config(settings: Settings, model_type: str) -> dict[str, Any]:
    """Config of ``model_type`` from model.* settings, overridden by model.params[model_type]."""
    import dataclasses

    from models import config_class

    m = settings.model
    fields = {f.name for f in dataclasses.fields(config_class(model_type))}
    base: dict[str, Any] = {
        "context": m.context,
        "horizon": m.horizon,
        "quantiles": list(m.quantiles),
        "learning_rate": m.learning_rate,
        "seed": m.seed,
        "season": m.season,
    }
    config = {k: v for k, v in base.items() if k in fields}
    config.update(m.params.get(model_type, {}))
    return config


class _StopOnEvent:
    """Lightning callback factory: stop training at the end of a batch once ``event`` is set."""

    @staticmethod
    def make(event: threading.Event) -> Any:
        from pytorch_lightning.callbacks import Callback

        class StopOnEvent(Callback):
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                if event.is_set():
                    trainer.should_stop = True

        return StopOnEvent()


def evaluate(model: ForecastModel, data: CycleData, settings: Settings) -> BacktestResult:
    """Score ``model`` on the holdout origins with the metrics of `rollcast backtest`."""
    from models import create_model
    from models.backtest import BacktestResult, forecast_at, score

    cfg = model.config
    m = data.matrix
    L, H, qs = cfg.context, cfg.horizon, tuple(cfg.quantiles)
    forecasts = forecast_at(model, m, data.origins)
    actuals = np.stack([m.values[:, o : o + H] for o in data.origins], axis=1)
    baselines = {
        name: forecast_at(create_model(name, **kw), m, data.origins)
        for name, kw in (
            ("naive", {"context": L, "horizon": H, "quantiles": qs}),
            ("seasonal_naive", {"context": L, "horizon": H, "quantiles": qs, "season": settings.model.season}),
        )
    }
    insample = m.values[:, : int(data.origins[0])]
    scores = score(forecasts, actuals, insample, settings.model.season, cfg.median_index, baselines)
    return BacktestResult(getattr(model, "name", ""), scores, forecasts, actuals, data.origins, qs, m.series)


def seasonal_naive_eval(settings: Settings, data: CycleData) -> BacktestResult:
    from models import create_model

    m = settings.model
    baseline = create_model(
        "seasonal_naive", context=m.context, horizon=m.horizon, quantiles=list(m.quantiles), season=m.season
    )
    return evaluate(baseline, data, settings)


def train_candidates(
    settings: Settings, data: CycleData, progress: bool, stop: threading.Event
) -> list[Candidate]:
    """Train every type in model.types and score it on the holdout."""
    from models import create_model
    from models.data import make_samples
    from models.training import fit

    out = []
    for model_type in settings.model.types:
        config = model_config(settings, model_type)
        model = create_model(model_type, **config)
        cfg = model.config
        train = make_samples(data.matrix, cfg.context, cfg.horizon, data.train_span, cfg.calendar)
        val = make_samples(data.matrix, cfg.context, cfg.horizon, data.val_span, cfg.calendar)
        if model.trainable and len(train) == 0:
            raise NotEnoughData(
                f"no training samples for {model_type}: {data.span.train_windows} training windows per series "
                f"are fewer than context {cfg.context} + horizon {cfg.horizon}"
            )
        log.info("training %s on %d samples (%d validation), up to %d epochs",
                 model_type, len(train), len(val), settings.model.max_epochs)
        t0 = time.perf_counter()
        try:
            result = fit(
                model, train, val,
                max_epochs=settings.model.max_epochs,
                patience=settings.model.patience,
                batch_size=settings.model.batch_size,
                seed=settings.model.seed,
                progress=progress,
                callbacks=[_StopOnEvent.make(stop)],
            )
        except SystemExit:
            # Lightning chains our SIGTERM handler and then raises SIGTERMException (a SystemExit).
            if stop.is_set():
                return out
            raise
        seconds = time.perf_counter() - t0
        if stop.is_set():
            return out
        backtest = evaluate(model, data, settings)
        metrics = {f"holdout_{k}": v for k, v in backtest.metrics.items()}
        cand = Candidate(model_type, config, model, result.train_loss, result.val_loss, metrics, backtest, seconds)
        cand.failure = validation_failure(cand)
        out.append(cand)
        log.info("%s: holdout MAE %.5g (relative to seasonal naive %.3g)%s", model_type, cand.mae,
                 metrics.get("holdout_rel_mae_seasonal_naive", float("nan")),
                 f"; FAILED validation: {cand.failure}" if cand.failure else "")
    return out


def validation_failure(cand: Candidate) -> str | None:
    """Why ``cand`` must never serve (non-finite losses, metrics or forecasts), or None."""
    bad_losses = [f"{name}[{i}]={v}" for name, losses in (("train_loss", cand.train_loss), ("val_loss", cand.val_loss))
                  for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad_losses:
        return "non-finite loss: " + ", ".join(bad_losses[:5])
    bad = [k for k in ("holdout_mae", "holdout_rmse", "holdout_smape") if not math.isfinite(cand.metrics.get(k, math.nan))]
    if bad:
        return "non-finite holdout metric(s): " + ", ".join(f"{k}={cand.metrics.get(k)}" for k in bad)
    if not np.isfinite(cand.backtest.forecasts).all():
        return "non-finite forecasts on the holdout"
    return None


def decide(
    candidates: list[Candidate],
    baseline_mae: float,
    champion_mae: float | None,
    min_improvement: float,
) -> Candidate | None:
    """Set every candidate's ``decision``; return the one to promote (the lowest eligible MAE), if any.

    Eligible: passed validation, MAE below the seasonal-naive MAE, and (when a
    champion was scored) MAE below ``champion_mae * (1 - min_improvement)``.
    """
    eligible = []
    for c in candidates:
        if c.failure:
            c.decision = f"not promoted: failed validation ({c.failure})"
        elif not c.mae < baseline_mae:
            c.decision = f"not promoted: MAE {c.mae:.6g} does not beat seasonal naive {baseline_mae:.6g}"
        elif champion_mae is not None and not c.mae < champion_mae * (1 - min_improvement):
            c.decision = (f"not promoted: MAE {c.mae:.6g} does not beat the champion's {champion_mae:.6g} "
                          f"by the margin {min_improvement:g}")
        else:
            eligible.append(c)
    best = min(eligible, key=lambda c: c.mae) if eligible else None
    for c in eligible:
        c.decision = "promoted" if c is best else f"not promoted: {best.model_type} is better this cycle"
    return best


# --------------------------------------------------------------------------- MLflow


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


def plot_losses(cand: Candidate, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = range(1, len(cand.train_loss) + 1)
    ax.plot(list(epochs), cand.train_loss, marker="o", label="train")
    if cand.val_loss:
        ax.plot(list(range(1, len(cand.val_loss) + 1)), cand.val_loss, marker="o", label="validation")
    ax.set(xlabel="epoch", ylabel="pinball loss (normalised)", title=f"{cand.model_type}: loss per epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_forecasts(
    cand: Candidate, data: CycleData, others: dict[str, BacktestResult], directory: Path
) -> list[Path]:
    """One PNG per plotted series: actuals over the holdout, the new model's median and outer
    quantile band at every origin, and the medians of the champion and seasonal naive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, bt = data.matrix, cand.backtest
    H = bt.forecasts.shape[2]
    mid = list(bt.quantiles).index(0.5)
    first = int(data.origins[0])
    lo = max(0, first - 2 * H)
    times = [datetime.fromtimestamp(t / 1000, UTC) for t in m.window_end_ms]
    paths = []
    for s, name in enumerate(m.series[:PLOTTED_SERIES]):
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.plot(times[lo:], m.values[s, lo:], color="black", lw=1, label="actual")
        for i, o in enumerate(data.origins):
            t = times[int(o) : int(o) + H]
            ax.fill_between(t, bt.forecasts[s, i, :, 0], bt.forecasts[s, i, :, -1], color="C0", alpha=0.2,
                            label=f"{cand.model_type} q{bt.quantiles[0]:g}-q{bt.quantiles[-1]:g}" if i == 0 else None)
            ax.plot(t, bt.forecasts[s, i, :, mid], color="C0", label=f"{cand.model_type} median" if i == 0 else None)
            for j, (label, other) in enumerate(others.items()):
                omid = list(other.quantiles).index(0.5)
                ax.plot(t, other.forecasts[s, i, :, omid], color=f"C{j + 1}", ls="--", lw=1,
                        label=f"{label} median" if i == 0 else None)
        ax.axvline(times[first], color="grey", ls=":", lw=1)
        ax.set(title=f"{name}: holdout forecasts vs actuals", ylabel="value")
        ax.legend(fontsize="small")
        fig.autofmt_xdate()
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        path = directory / f"forecast_{s}_{safe}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def input_example(cand: Candidate, data: CycleData, settings: Settings) -> tuple[Any, Any]:
    """A pyfunc input frame (the last ``context`` windows of two series) and its forecasts."""
    import pandas as pd

    from jobs.pyfunc_model import forecast_frame, frame_to_context
    from models import predict

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


def version_tags(cand: Candidate, span: Span, cycle_id: str) -> dict[str, str]:
    tags = {
        "model_type": cand.model_type,
        "cycle_id": cycle_id,
        "code_version": code_version(),
        "data_start": _iso(span.start_ms),
        "data_end": _iso(span.end_ms),
        "data_start_ms": str(span.start_ms),
        "data_end_ms": str(span.end_ms),
        "validation_status": "failed" if cand.failure else "passed",
        "promotion": cand.decision,
    }
    if cand.failure:
        tags["validation_reason"] = cand.failure
    for k in ("holdout_mae", "holdout_rmse", "holdout_smape", "holdout_mase", "holdout_coverage",
              "champion_holdout_mae", "seasonal_naive_holdout_mae"):
        if k in cand.metrics:
            tags[k] = f"{cand.metrics[k]:.6g}"
    return tags


def publish(settings: Settings, cand: Candidate, data: CycleData, others: dict[str, BacktestResult],
            cycle_id: str, attempts: _Attempts) -> None:
    """Log one run with everything, then register its model as a new version (never half-done).

    A retry after a failed registration registers the already complete run
    instead of logging it again.
    """
    from jobs import registry

    if cand.model_uri is None:
        _log_run(settings, cand, data, others, cycle_id, attempts)
    assert cand.run_id is not None and cand.model_uri is not None
    cand.version = registry.register(settings, cand.model_uri, cand.run_id,
                                     version_tags(cand, data.span, cycle_id), model_id=cand.model_id)


def _log_run(settings: Settings, cand: Candidate, data: CycleData, others: dict[str, BacktestResult],
             cycle_id: str, attempts: _Attempts) -> None:
    """One finished run with params, metrics, plots and the pyfunc model; sets ``cand.model_uri``."""
    import mlflow

    from jobs import registry
    from models import save_model

    with registry.mlflow_errors(settings, f"logging the {cand.model_type} run"):
        experiment = mlflow.set_experiment(settings.mlflow.experiment)
        run = mlflow.start_run(
            experiment_id=experiment.experiment_id,
            run_name=f"{cand.model_type}-{cycle_id}",
            tags={"rollcast.cycle_id": cycle_id, "rollcast.model_type": cand.model_type,
                  "rollcast.code_version": code_version(), "validation_status": "failed" if cand.failure else "passed"},
        )
    run_id = run.info.run_id
    attempts.incomplete_runs.append(run_id)
    try:
        with registry.mlflow_errors(settings, f"logging the {cand.model_type} run"), \
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
                mlflow.set_tag("validation_reason", cand.failure)
            mlflow.set_tag("promotion", cand.decision)
            plots = tmpdir / "plots"
            plots.mkdir()
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
                artifacts={registry.MODEL_ARTIFACT: str(saved), registry.SERVING_ARTIFACT: str(serving)},
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
            )
            mlflow.end_run("FINISHED")
        attempts.incomplete_runs.remove(run_id)
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


def _mark_incomplete(settings: Settings, run_ids: list[str]) -> None:
    """Mark runs a failed attempt left open as FAILED (best effort, when MLflow is back)."""
    if not run_ids or not _reachable(settings):
        return
    import mlflow

    client = mlflow.MlflowClient()
    for run_id in list(run_ids):
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "rollcast.incomplete", "true")
            client.set_terminated(run_id, "FAILED")
            run_ids.remove(run_id)


def _reachable(settings: Settings) -> bool:
    from jobs import registry

    return registry.reachable(settings)


# --------------------------------------------------------------------------- one cycle, with retries


def run_cycle(
    settings: Settings,
    *,
    progress: bool = False,
    stop: threading.Event | None = None,
    on_trained: Callable[[list[Candidate]], None] | None = None,
) -> CycleResult | None:
    """Run one training cycle, retrying while MLflow is unreachable; None if ``stop`` was set.

    ``on_trained`` is called once the models are trained and scored, before
    anything is logged (progress reporting; tests use it to stop MLflow).
    Raises :class:`MlflowUnavailable` when the retries are used up,
    :class:`NotEnoughData` when the history is too short.
    """
    stop = stop or threading.Event()
    cycle_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    state = _Attempts()
    retries, backoff = settings.train.max_retries, settings.train.retry_backoff_s
    for attempt in range(retries + 1):
        try:
            result = _attempt(settings, state, cycle_id, progress, stop, on_trained)
            if result is not None:
                result.attempts = attempt + 1
            return result
        except MlflowUnavailable as e:
            _mark_incomplete(settings, state.incomplete_runs)
            if attempt == retries:
                raise MlflowUnavailable(
                    f"{e} (gave up after {retries + 1} attempt(s); the champion was not changed)"
                ) from e
            delay = backoff * 2**attempt
            log.warning("cycle %s: %s; retrying in %.1fs (attempt %d of %d)", cycle_id, e, delay,
                        attempt + 2, retries + 1)
            if stop.wait(delay):
                return None
    return None


def _attempt(
    settings: Settings,
    state: _Attempts,
    cycle_id: str,
    progress: bool,
    stop: threading.Event,
    on_trained: Callable[[list[Candidate]], None] | None,
) -> CycleResult | None:
    from jobs import registry
    from models import load_model

    client = registry.configure(settings)
    if not registry.reachable(settings):
        raise MlflowUnavailable(f"no MLflow server answers at {settings.mlflow.tracking_uri}")
    _mark_incomplete(settings, state.incomplete_runs)
    if state.data is None:
        state.data = prepare_data(settings)
    data = state.data
    # The champion as it is now: scored on the same origins as the new models.
    found = registry.champion_version(settings, client)
    champ_version = str(found.version) if found is not None else None
    if champ_version != state.champion_version or (champ_version and state.champion_eval is None):
        state.champion_version, state.champion_eval, state.champion_note = champ_version, None, ""
        if champ_version is not None:
            champ = load_model(registry.download_version(settings, champ_version))
            cc = champ.config
            if cc.horizon != settings.model.horizon or cc.context > int(data.origins[0]):
                state.champion_note = (f"champion version {champ_version} (horizon {cc.horizon}, context "
                                       f"{cc.context}) cannot be scored at this cycle's origins")
                log.warning("%s; comparing new models with seasonal naive only", state.champion_note)
            else:
                state.champion_eval = evaluate(champ, data, settings)
    if state.candidates is None:
        candidates = train_candidates(settings, data, progress, stop)
        if stop.is_set():
            log.info("cycle %s abandoned: asked to stop", cycle_id)
            return None
        state.candidates = candidates
        if on_trained is not None:
            on_trained(candidates)
    candidates = state.candidates
    baseline = seasonal_naive_eval(settings, data)
    champ_eval = state.champion_eval
    for c in candidates:
        c.metrics.update({f"seasonal_naive_holdout_{k}": v for k, v in baseline.metrics.items()
                          if not k.startswith("rel_")})
        if champ_eval is not None:
            c.metrics.update({f"champion_holdout_{k}": v for k, v in champ_eval.metrics.items()
                              if not k.startswith("rel_")})
            if champ_eval.metrics["mae"] > 0:
                c.metrics["holdout_rel_mae_champion"] = c.mae / champ_eval.metrics["mae"]
    best = decide(candidates, baseline.metrics["mae"],
                  champ_eval.metrics["mae"] if champ_eval is not None else None, settings.train.min_improvement)
    others = {"seasonal_naive": baseline}
    if champ_eval is not None:
        others[f"champion v{state.champion_version}"] = champ_eval
    for c in candidates:
        if c.version is None:  # registered in an earlier attempt: not again
            publish(settings, c, data, others, cycle_id, state)
    promoted = None
    if best is not None:
        assert best.version is not None
        current = registry.champion_version(settings, client)
        if (str(current.version) if current else None) != state.champion_version:
            log.warning("champion moved to version %s during this cycle; not overriding it",
                        current.version if current else None)
        else:
            registry.promote(settings, best.version, client)
            promoted = best.version
    for c in candidates:
        log.info("cycle %s: %s -> version %s, run %s: %s", cycle_id, c.model_type, c.version, c.run_id, c.decision)
    return CycleResult(cycle_id, data.span, candidates, state.champion_version, promoted)


# --------------------------------------------------------------------------- the job


class Schedule:
    """When the next cycle is due: every ``every_s`` seconds and/or after ``after_windows`` new windows.

    ``count`` (the windows in the store) may raise :class:`StoreUnavailable`: while the store does not
    answer, no cycle is due for new windows (one warning per outage), and counting starts again from
    the first answer."""

    def __init__(self, every_s: float | None, after_windows: int | None, count: Callable[[], int]):
        self.every_s, self.after_windows, self.count = every_s, after_windows, count
        self._store_down = False
        self.last_time = time.monotonic()
        self.last_count = self._count()

    def _count(self) -> int | None:
        if self.after_windows is None:
            return None
        try:
            n = self.count()
        except StoreUnavailable as e:
            if not self._store_down:
                log.warning("cannot count the new windows (%s); no cycle for new windows until it answers", e)
            self._store_down = True
            return None
        if self._store_down:
            log.info("the history store answers again")
            self._store_down = False
        return n

    def mark(self) -> None:
        self.last_time = time.monotonic()
        self.last_count = self._count()

    def resume(self, ago_s: float, new_windows: int | None) -> None:
        """Go on from a cycle that ended ``ago_s`` seconds ago, since which ``new_windows`` windows
        (None: not known) reached the store."""
        self.last_time = time.monotonic() - max(0.0, ago_s)
        now = self._count()
        if new_windows is not None and now is not None:
            self.last_count = now - new_windows

    def _new_windows(self) -> int | None:
        now = self._count()
        if now is None:
            return None
        if self.last_count is None:  # the store did not answer at the last cycle: count from now
            self.last_count = now
        return now - self.last_count

    def next(self) -> str:
        """When the next cycle is due, in words."""
        parts = []
        if self.every_s is not None:
            left = max(0.0, self.every_s - (time.monotonic() - self.last_time))
            parts.append(f"in {left / 60:.1f} minutes")
        if self.after_windows is not None:
            new = self._new_windows()
            parts.append(f"after {self.after_windows - new} more windows" if new is not None
                         else f"after {self.after_windows} new windows")
        return " or ".join(parts)

    def due(self) -> str | None:
        """Why a cycle is due now, or None."""
        if self.every_s is not None and time.monotonic() - self.last_time >= self.every_s:
            return f"{self.every_s / 60:g} minutes passed"
        if self.after_windows is not None:
            new = self._new_windows()
            if new is not None and new >= self.after_windows:
                return f"{new} new windows"
        return None


def run(settings: Settings, args: argparse.Namespace) -> int:
    from jobs import registry
    from pipeline.observability import Health, serve_http
    from pipeline.store import HistoryStore

    overrides = {k: v for k, v in (("train.every_minutes", args.every_minutes),
                                   ("train.after_windows", args.after_windows)) if v is not None}
    if overrides:
        settings = settings.replace(**overrides)
    if settings.train.every_minutes is None and settings.train.after_windows is None and not args.once:
        raise ConfigError(["train: set train.every_minutes or train.after_windows (or run with --once)"])
    registry.configure(settings)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        from pipeline.observability import exit_after

        log.info("signal %d: stopping after the current step", signum)
        if not stop.is_set():
            exit_after(settings.observability.shutdown_timeout_s, "train")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    progress = sys.stderr.isatty() and not args.no_progress

    if args.once:
        result = run_cycle(settings, progress=progress, stop=stop)
        if result is not None:
            _report(result)
        return 0

    health = Health("train", poll_interval_s=max(120.0, 10 * args.poll_s))
    if settings.observability.metrics_port is not None:
        serve_http(settings.observability.metrics_port, health)
    store = HistoryStore(settings)
    t = settings.train
    schedule = Schedule(t.every_minutes * 60 if t.every_minutes else None, t.after_windows, store.counter())
    reason = resume(settings, schedule, store)
    while not stop.is_set():
        if reason is not None:
            log.info("training cycle: %s", reason)
            schedule.mark()
            _guarded_cycle(settings, progress, stop, health)
        health.polled()
        if stop.wait(args.poll_s):
            break
        reason = schedule.due()
    log.info("train job stopped")
    return 0


def resume(settings: Settings, schedule: Schedule, store: Any) -> str | None:
    """Continue the schedule from the last cycle recorded in MLflow (the newest registered version: when
    it was created, and the windows newer than its data); return why a cycle is due now, or None.

    A restarted job (a deploy, a crash, ``rollcast up`` after ``train --once``) would otherwise count
    "every T minutes" from its own start and retrain at once, however recent the last model. With no
    version yet, or MLflow unreachable, the first cycle runs at start.
    """
    from jobs import registry

    try:
        last = registry.latest_version(settings)
    except MlflowUnavailable as e:
        log.warning("cannot look up the last cycle (%s); training now", e)
        return "start-up (the last cycle is unknown)"
    if last is None:
        return "start-up (no version yet)"
    ago_s = max(0.0, time.time() - last.creation_timestamp / 1000)  # a server clock ahead: as if just now
    data_end = str((last.tags or {}).get("data_end_ms", ""))
    new_windows = None  # counted only for an after_windows schedule: a filtered read of every file
    if schedule.after_windows is not None and data_end.isdigit():
        try:
            new_windows = store.count(after_ms=int(data_end))
        except StoreUnavailable as e:
            log.warning("cannot count the windows since the last cycle (%s); counting from now", e)
    schedule.resume(ago_s, new_windows)
    reason = schedule.due()
    log.info("last cycle: version %s of %s, %.1f minutes ago; %s", last.version, settings.mlflow.registered_model,
             ago_s / 60, f"training now: {reason}" if reason else f"next cycle {schedule.next()}")
    return reason


def _guarded_cycle(settings: Settings, progress: bool, stop: threading.Event, health: Any) -> None:
    """One cycle of the long-running job: data and MLflow outages are logged, not fatal."""
    try:
        result = run_cycle(settings, progress=progress, stop=stop)
    except NotEnoughData as e:
        CYCLES.labels("not_enough_data").inc()
        log.warning("no cycle: %s", e)
        return
    except (MlflowUnavailable, StoreUnavailable) as e:
        CYCLES.labels("mlflow_unavailable" if isinstance(e, MlflowUnavailable) else "store_unavailable").inc()
        health.facts["last_error"] = str(e)
        log.error("cycle failed: %s", e)
        return
    if result is None:
        CYCLES.labels("aborted").inc()
        return
    CYCLES.labels("promoted" if result.promoted else "not_promoted").inc()
    LAST_SUCCESS.set(time.time())
    health.facts.update(last_cycle=result.cycle_id, champion=result.promoted or result.champion_before)
    champ = result.promoted or result.champion_before
    if champ is not None:
        CHAMPION_VERSION.set(int(champ))
    _report(result)


def _report(result: CycleResult) -> None:
    s = result.span
    print(f"cycle {result.cycle_id}: {s.series} series, windows {_iso(s.start_ms)} .. {_iso(s.end_ms)}", flush=True)
    for c in result.candidates:
        print(f"  {c.model_type:<16} version {c.version:<4} holdout MAE {c.mae:.5g}  "
              f"(seasonal naive {c.metrics.get('seasonal_naive_holdout_mae', float('nan')):.5g}, "
              f"champion {c.metrics.get('champion_holdout_mae', float('nan')):.5g})  {c.decision}", flush=True)
    if result.promoted:
        print(f"champion -> version {result.promoted}", flush=True)
    else:
        print(f"champion unchanged ({result.champion_before or 'none yet'})", flush=True)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

