"""One training cycle: read the span, split it by time, train every configured type, score each on the
same holdout as the current champion and seasonal naive, log and register every model, and move
``champion`` when one is better.

A cycle reads the last ``train.span_windows`` windows per series from the history store into one float32
matrix (in bounded memory, :func:`models.data.read_matrix`), splits it by time into train, validation and
holdout (the last ``train.holdout_windows`` windows, rounded down to whole horizons), trains every type in
``model.types`` with Lightning on ``train.samples_per_epoch`` (series, time) samples drawn anew each epoch
(:mod:`models.train.sampling`; nothing is materialised), and scores on the holdout, at the same rolling origins
and on the same ``train.holdout_series`` series, the new model, the current champion and the
seasonal-naive baseline (:func:`models.train.backtest.evaluate`, the metrics of `rollcast backtest`).

A cycle is *full* (from scratch) or *warm* (:func:`plan_cycle`): when the champion has the same type and
config, it is fine-tuned for ``train.warm_epochs`` on the newest ``train.warm_span_windows`` at
``train.warm_learning_rate``, except every ``train.full_every``-th cycle, counted from the lineage tags of
the newest version. Both are judged by the same gate. Under DDP (``train.strategy = "ddp"``) every rank
trains; only rank 0 scores, logs to MLflow and registers. Each model gets one MLflow run and
one new registered version (:func:`models.tracking.runs.publish`); :func:`models.train.selection.decide` says which, if any,
takes the alias. If MLflow is unreachable the cycle is retried ``train.max_retries`` times with
exponential backoff (trained models are kept, not retrained), and a failed cycle never touches the
serving champion.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from models import tracking
from models.tracking.runs import iso
from models.tracking.tags import HOLDOUT_REL_MAE, HOLDOUT_REL_MAE_CHAMPION
from models.train.selection import Candidate, decide, validation_failure
from pipeline.config import Settings
from pipeline.errors import ConfigError, MlflowUnavailable, NotEnoughData

if TYPE_CHECKING:
    from models.data import SeriesMatrix
    from models.train.backtest import BacktestResult

log = logging.getLogger("rollcast.train")


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
            "data_start": iso(self.start_ms),
            "data_end": iso(self.end_ms),
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
    holdout: SeriesMatrix  # the series every model of the cycle is scored on (train.holdout_series of them)


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
    champion: Champion | None = None
    champion_eval: BacktestResult | None = None
    champion_note: str = ""
    incomplete_runs: list[str] = field(default_factory=list)


def read_history(settings: Settings) -> tuple[SeriesMatrix, int, int, int]:
    """The last ``train.span_windows`` windows per series as a float32 matrix, read in bounded memory
    (:func:`models.data.read_matrix`): (matrix, rows read, first window_start, last window_end)."""
    from models.data import read_matrix
    from pipeline.store import HistoryStore

    store = HistoryStore(settings)
    end = store.last_window_end()  # from the newest day's Parquet footers, not a pass over the store
    if end is None:
        raise NotEnoughData(
            f"the history store {store.location} is empty; run `rollcast ingest` "
            "(and `rollcast replay` a dataset) first"
        )
    step = settings.window.length_ms
    start = end - settings.train.span_windows * step
    matrix, rows, first_start = read_matrix(store, start, end, settings.window.target, step_ms=step)
    return matrix, rows, first_start, end


def holdout_rows(n_series: int, limit: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the series scored on the holdout: all of them, or a seeded subsample of ``limit``."""
    if n_series <= limit:
        return np.arange(n_series)
    return np.sort(np.random.default_rng([seed, 1]).choice(n_series, size=limit, replace=False))


def prepare_data(settings: Settings) -> CycleData:
    """Read the span and split it by time; :class:`NotEnoughData` when it is too short."""
    from models.data import time_split
    from models.train.backtest import origins_for

    L, H = settings.model.context, settings.model.horizon
    matrix, rows, start_ms, end_ms = read_history(settings)
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
        windows=rows,
        train_windows=split.train[1] - split.train[0],
        val_windows=split.val[1] - split.val[0],
        holdout_windows=holdout,
    )
    scored = matrix.rows(holdout_rows(len(matrix.series), settings.train.holdout_series, settings.model.seed))
    return CycleData(matrix, span, split.train, split.val, origins, scored)


def evaluate_on_holdout(model: Any, data: CycleData, settings: Settings) -> BacktestResult:
    """Score ``model`` at the holdout origins of ``data``, as every model of the cycle is scored."""
    from models.train.backtest import evaluate

    return evaluate(model, data.holdout, data.origins, settings.model.season)


def holdout_calibration(model: Any, data: CycleData, settings: Settings) -> Any:
    """The split-conformal offsets of ``model`` on the holdout of ``data`` (origins every step over the
    holdout, thinned to a bounded number of contexts: :func:`models.train.backtest.window_offsets`), or None
    when calibration is off or starts from zero."""
    from models.train.backtest import window_offsets

    cal = settings.calibration
    if not (cal.enabled and settings.scoring.enabled and cal.start == "holdout"):
        return None
    return window_offsets(model, data.holdout, int(data.origins[0]), data.holdout.values.shape[1], cal.max_offset)


def seasonal_naive_eval(settings: Settings, data: CycleData) -> BacktestResult:
    from models.train.backtest import baseline

    m = settings.model
    return evaluate_on_holdout(baseline("seasonal_naive", m.context, m.horizon, m.quantiles, m.season), data, settings)


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


@dataclass
class Champion:
    """The serving version as a cycle found it: scored on the holdout, and the parent of warm starts."""

    version: str
    model: Any
    model_type: str


@dataclass(frozen=True)
class Plan:
    """How one model type is trained this cycle: from scratch (``full``) or fine-tuned from the champion."""

    kind: str  # tracking.CYCLE_FULL or tracking.CYCLE_WARM
    parent: str | None = None  # the champion version a warm start fine-tunes
    warm_cycles: int = 0  # warm cycles in a row, this one included, since the last full retrain


def plan_cycle(settings: Settings, model_type: str, model: Any, champion: Champion | None,
               newest_tags: dict[str, str] | None) -> Plan:
    """Warm-start from the champion when it has this type and config and the last ``train.full_every - 1``
    cycles (counted from the newest registered version's lineage tags) were not all warm; else full."""
    if champion is None or champion.model_type != model_type:
        return Plan(tracking.CYCLE_FULL)
    if champion.model.config.to_dict() != model.config.to_dict():
        return Plan(tracking.CYCLE_FULL)
    tags = newest_tags or {}
    done = int(tags.get(tracking.WARM_CYCLES_TAG, "0") or 0) if tags.get(tracking.CYCLE_KIND_TAG) == tracking.CYCLE_WARM else 0
    if done + 1 >= settings.train.full_every:
        return Plan(tracking.CYCLE_FULL)
    return Plan(tracking.CYCLE_WARM, champion.version, done + 1)


def training_sets(settings: Settings, data: CycleData, cfg: Any, plan: Plan) -> tuple[Any, Any]:
    """The training and validation samples of one model: plans of (series, t) pairs over the matrix, drawn
    per batch (:func:`models.train.sampling.training_samples`, as every backtest refit draws them), never
    materialised. A warm cycle trains on the newest ``train.warm_span_windows`` only."""
    from models.train.sampling import training_samples

    t = settings.train
    lo, hi = data.train_span
    if plan.kind == tracking.CYCLE_WARM:  # the newest windows only
        lo = max(lo, hi - t.warm_span_windows)
    return training_samples(data.matrix, cfg, (lo, hi), data.val_span, t, settings.model.seed)


def train_candidates(
    settings: Settings, data: CycleData, progress: bool, stop: threading.Event,
    champion: Champion | None = None, newest_tags: dict[str, str] | None = None,
) -> tuple[list[Candidate], int]:
    """Train every type in model.types and score it on the holdout; returns the candidates and this
    process's DDP rank (a rank other than 0 trains, then returns no candidates)."""
    from models.registry import config_from_settings, create_model
    from models.train.fit import fit

    out = []
    rank = 0
    t = settings.train
    if t.threads is not None:
        import torch

        torch.set_num_threads(t.threads)
    for model_type in settings.model.types:
        config = config_from_settings(settings.model, model_type)
        model = create_model(model_type, **config)
        cfg = model.config
        plan = plan_cycle(settings, model_type, model, champion, newest_tags) if model.trainable else Plan(
            tracking.CYCLE_FULL)
        if plan.kind == tracking.CYCLE_WARM:
            assert champion is not None
            model = copy.deepcopy(champion.model)
        train, val = training_sets(settings, data, cfg, plan)
        if model.trainable and len(train) == 0:
            raise NotEnoughData(
                f"no training samples for {model_type}: {data.span.train_windows} training windows per series "
                f"are fewer than context {cfg.context} + horizon {cfg.horizon}"
            )
        warm = plan.kind == tracking.CYCLE_WARM
        epochs = t.warm_epochs if warm else settings.model.max_epochs
        log.info("training %s (%s%s) on %d samples per epoch (%d validation), up to %d epochs", model_type,
                 plan.kind, f" from version {plan.parent}" if warm else "", len(train), len(val), epochs)
        t0 = time.perf_counter()
        try:
            result = fit(
                model, train, val,
                max_epochs=epochs,
                patience=settings.model.patience,
                batch_size=settings.model.batch_size,
                seed=settings.model.seed,
                progress=progress,
                callbacks=[_StopOnEvent.make(stop)],
                accelerator=t.accelerator,
                devices=t.devices,
                strategy=t.strategy,
                num_nodes=t.num_nodes,
                learning_rate=t.warm_learning_rate if warm else None,
            )
        except SystemExit:
            # Lightning chains our SIGTERM handler and then raises SIGTERMException (a SystemExit).
            if stop.is_set():
                return out, rank
            raise
        seconds = time.perf_counter() - t0
        rank = result.global_rank
        if stop.is_set():
            return out, rank
        if rank != 0:  # only rank 0 scores, logs and registers
            continue
        backtest = evaluate_on_holdout(model, data, settings)
        metrics = {f"holdout_{k}": v for k, v in backtest.metrics.items()}
        calibration = holdout_calibration(model, data, settings)
        if calibration is not None:  # coverage of the 80% interval, raw and split-conformal (out of sample)
            metrics.update({f"holdout_coverage_{k}": v for k, v in calibration.coverage.items()})
        cand = Candidate(model_type, config, model, result.train_loss, result.val_loss, metrics, backtest, seconds,
                         cycle_kind=plan.kind, parent_version=plan.parent, warm_cycles=plan.warm_cycles,
                         calibration=calibration)
        cand.failure = validation_failure(cand)
        out.append(cand)
        log.info("%s: holdout MAE %.5g (relative to seasonal naive %.3g)%s", model_type, cand.mae,
                 metrics.get(HOLDOUT_REL_MAE, float("nan")),
                 f"; FAILED validation: {cand.failure}" if cand.failure else "")
    return out, rank


def run_cycle(
    settings: Settings,
    *,
    progress: bool = False,
    stop: threading.Event | None = None,
    on_trained: Callable[[list[Candidate]], None] | None = None,
    trigger: dict[str, str] | None = None,
) -> CycleResult | None:
    """Run one training cycle, retrying while MLflow is unreachable; None if ``stop`` was set.

    ``on_trained`` is called once the models are trained and scored, before
    anything is logged (progress reporting; tests use it to stop MLflow).
    ``trigger``: tags saying what started the cycle (``tracking.TRIGGER_TAG`` and its figures), put on
    every run and version of the cycle.
    Raises :class:`MlflowUnavailable` when the retries are used up,
    :class:`NotEnoughData` when the history is too short.
    """
    stop = stop or threading.Event()
    cycle_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    state = _Attempts()
    retries, backoff = settings.train.max_retries, settings.train.retry_backoff_s
    for attempt in range(retries + 1):
        try:
            result = _attempt(settings, state, cycle_id, progress, stop, on_trained, trigger)
            if result is not None:
                result.attempts = attempt + 1
            return result
        except MlflowUnavailable as e:
            tracking.mark_incomplete(settings, state.incomplete_runs)
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
    trigger: dict[str, str] | None = None,
) -> CycleResult | None:
    from models import load_model

    client = tracking.configure(settings)
    if not tracking.reachable(settings):
        raise MlflowUnavailable(f"no MLflow server answers at {settings.mlflow.tracking_uri}")
    tracking.mark_incomplete(settings, state.incomplete_runs)
    if state.data is None:
        state.data = prepare_data(settings)
    data = state.data
    # The champion as it is now: the parent of warm starts, scored on the same origins as the new models.
    found = tracking.champion_version(settings, client)
    champ_version = str(found.version) if found is not None else None
    if champ_version != state.champion_version or (champ_version and state.champion is None):
        state.champion_version, state.champion, state.champion_eval, state.champion_note = champ_version, None, None, ""
        if found is not None:
            champ = load_model(tracking.download_version(settings, str(found.version)))
            state.champion = Champion(str(found.version), champ, (found.tags or {}).get(tracking.MODEL_TYPE_TAG, ""))
    if state.candidates is None:
        newest = tracking.latest_version(settings, client)
        candidates, rank = train_candidates(settings, data, progress, stop, state.champion,
                                            dict(newest.tags or {}) if newest is not None else None)
        if stop.is_set():
            log.info("cycle %s abandoned: asked to stop", cycle_id)
            return None
        if rank != 0:
            log.info("cycle %s: rank %d trained; rank 0 scores, logs and registers", cycle_id, rank)
            return None
        state.candidates = candidates
        if on_trained is not None:
            on_trained(candidates)
    if state.champion is not None and state.champion_eval is None:
        cc = state.champion.model.config
        if cc.horizon != settings.model.horizon or cc.context > int(data.origins[0]):
            state.champion_note = (f"champion version {champ_version} (horizon {cc.horizon}, context "
                                   f"{cc.context}) cannot be scored at this cycle's origins")
            log.warning("%s; comparing new models with seasonal naive only", state.champion_note)
        else:
            state.champion_eval = evaluate_on_holdout(state.champion.model, data, settings)
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
                c.metrics[HOLDOUT_REL_MAE_CHAMPION] = c.mae / champ_eval.metrics["mae"]
    best = decide(candidates, baseline.metrics["mae"],
                  champ_eval.metrics["mae"] if champ_eval is not None else None, settings.train.min_improvement)
    others = {"seasonal_naive": baseline}
    if champ_eval is not None:
        others[f"champion v{state.champion_version}"] = champ_eval
    for c in candidates:
        if c.version is None:  # registered in an earlier attempt: not again
            tracking.publish(settings, c, data, others, cycle_id, state.incomplete_runs, trigger)
    promoted = None
    if best is not None:
        assert best.version is not None
        current = tracking.champion_version(settings, client)
        if (str(current.version) if current else None) != state.champion_version:
            log.warning("champion moved to version %s during this cycle; not overriding it",
                        current.version if current else None)
        else:
            tracking.promote(settings, best.version, client)
            promoted = best.version
    for c in candidates:
        log.info("cycle %s: %s -> version %s, run %s: %s", cycle_id, c.model_type, c.version, c.run_id, c.decision)
    return CycleResult(cycle_id, data.span, candidates, state.champion_version, promoted)


