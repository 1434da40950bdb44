"""Rolling-origin evaluation, through the same :func:`models.predict` path as live forecasting.

The model is fitted on the steps before the first test origin (optionally
refitted every ``refit_every`` origins on everything before that origin).
Origins are spaced ``origin_every`` steps apart (default H: their forecasts tile
the last ``n_origins * H`` steps; 1: an origin every window, as the forecast job
forecasts), the last one H steps before the end; at each one the model forecasts
the next H steps from the true history up to the origin. Metrics are averaged
over all origins' forecasts and series (closer than H apart, forecasts overlap
and a time step counts once per forecast covering it); relative MAE divides by
the MAE of naive and seasonal-naive forecasts at the same origins. Inference is
batched over origins (:func:`forecast_at`).

With calibration settings (``rollcast backtest`` passes ``settings.calibration``), the quantiles are also
calibrated online as the forecast job serves them (:func:`calibrate_sequentially`, the
:class:`~models.scoring.calibration.QuantileTracker` of the live job, same learning rate and offset bound), origin
after origin, and ``calibrated_coverage`` is the coverage of the served interval (q0.1-q0.9) next to
``coverage``, the model's own. The median, so every point metric, is the same either way. ``burn_in``
origins (the first ones) are left out of both coverages, not of the calibration nor of the point metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models import metrics as M
from models.base import ForecastModel
from models.data import SeriesMatrix, known_any, time_split
from models.io import predict
from models.registry import create_model
from models.scoring.calibration import HoldoutOffsets, QuantileTracker, holdout_coverage, holdout_offsets
from models.train.fit import FitResult, fit
from models.train.sampling import training_samples
from pipeline.config import CalibrationSettings, TrainSettings
from pipeline.errors import NotEnoughData
from pipeline.quantiles import interval_indices

BASELINES = ("naive", "seasonal_naive")


@dataclass
class BacktestResult:
    """Metrics and every forecast of one model's rolling-origin backtest."""

    model: str
    metrics: dict[str, float]
    forecasts: np.ndarray  # (S, n_origins, H, Q)
    actuals: np.ndarray  # (S, n_origins, H)
    origins: np.ndarray  # (n_origins,) time index of each origin
    quantiles: tuple[float, ...]
    series: list[str]
    fits: list[FitResult] = field(default_factory=list)
    forecastable: np.ndarray | None = None  # (S, n_origins): the context had a known value; None: all
    # (S, n_origins, H, Q): the quantiles as the forecast job would have served them (calibrated online,
    # :func:`calibrate_sequentially`); None: not calibrated
    calibrated: np.ndarray | None = None
    burn_in: int = 0
    # the split-conformal offsets each fit's calibration started from (one per fit; the baselines' one)
    priors: list[HoldoutOffsets] = field(default_factory=list)  # the first origins, left out of coverage and calibrated coverage (not of point metrics)


def origins_for(n_steps: int, context: int, horizon: int, n_origins: int, every: int | None = None) -> np.ndarray:
    """Time indices of the origins: ``every`` steps apart (default ``horizon``: every H steps through the
    last ``n_origins * H`` steps), the last one ``horizon`` steps before the end."""
    every = horizon if every is None else int(every)
    if every < 1:
        raise ValueError(f"origins must be at least 1 step apart, got {every}")
    first = n_steps - horizon - (n_origins - 1) * every
    if n_origins < 1 or first < context + horizon:
        raise NotEnoughData(
            f"{n_steps} steps per series are too few for {n_origins} test window(s) of {horizon} steps, "
            f"origins {every} step(s) apart, after a context of {context} and some training data; use fewer "
            "--test-windows, a smaller --origin-every or a shorter --context/--horizon"
        )
    return first + every * np.arange(n_origins)


# contexts (series x origins) per predict call of forecast_at: bounded memory (``L`` float64 values and
# window ends each), large enough that a model is not called once per origin
FORECAST_ROWS = 16384


def forecast_at(model: ForecastModel, data: SeriesMatrix, origins: np.ndarray) -> np.ndarray:
    """Forecasts ``(S, n_origins, H, Q)`` from the true history before each origin.

    The contexts of every series at many origins go through one :func:`~models.io.predict` call (up to
    :data:`FORECAST_ROWS` contexts at a time): each context is forecast on its own, the batch only
    saves calls (200 origins of an untrained TCN on 2 series, L=96: 13 s one call per origin, 0.3 s
    batched, on the 2-core sandbox)."""
    L, H, Q = model.config.context, model.config.horizon, len(model.config.quantiles)
    S = len(data.series)
    origins = np.asarray(origins, dtype=np.int64)
    out = np.empty((S, len(origins), H, Q), dtype=np.float32)
    per_call = max(1, FORECAST_ROWS // max(S, 1))
    for a in range(0, len(origins), per_call):
        chunk = origins[a : a + per_call]
        contexts = np.concatenate([data.contexts(int(o) - L, int(o)) for o in chunk])  # (n * S, L), origin-major
        ends = np.repeat(np.stack([data.window_end_ms[o - L : o] for o in chunk]), S, axis=0)
        fc = predict(model, contexts, ends)
        out[:, a : a + len(chunk)] = fc.reshape(len(chunk), S, H, Q).transpose(1, 0, 2, 3)
    return out


# contexts forecast to compute a model's split-conformal offsets (:func:`window_offsets`): the origins of
# the span are thinned to stay within it
CALIBRATION_CONTEXTS = 65536


def window_offsets(model: ForecastModel, data: SeriesMatrix, first: int, end: int,
                   max_offset: float = 20.0, max_contexts: int = CALIBRATION_CONTEXTS) -> HoldoutOffsets | None:
    """Split-conformal offsets (:func:`models.scoring.calibration.holdout_offsets`) of ``model`` from its
    forecasts at origins ``first .. end - H`` of ``data`` (every step, or every k-th so that at most
    ``max_contexts`` contexts are forecast), scored against the actuals before ``end`` (gaps left out), with
    the holdout coverage raw and calibrated (:func:`~models.scoring.calibration.holdout_coverage`). None
    when the span holds no whole horizon after a context."""
    cfg = model.config
    L, H = cfg.context, cfg.horizon
    first = max(int(first), L)
    last = int(end) - H
    if last < first:
        return None
    S = max(len(data.series), 1)
    every = max(1, -(-(last - first + 1) * S // max_contexts))
    origins = np.arange(first, last + 1, every)
    preds = forecast_at(model, data, origins)
    actuals = settled_actuals(data, origins, np.stack([data.values[:, o : o + H] for o in origins], axis=1))
    offsets = holdout_offsets(preds, actuals, data.series, cfg.quantiles, max_offset)
    offsets.coverage = holdout_coverage(preds, actuals, data.series, cfg.quantiles, max_offset)
    return offsets


def settled_actuals(data: SeriesMatrix, origins: np.ndarray, actuals: np.ndarray) -> np.ndarray:
    """``actuals`` ``(S, n_origins, H)`` as the forecast job settles them: live, a gap window settles nothing
    (its value is NaN), while the matrix carries the last value forward across gaps."""
    if data.known is None:
        return actuals
    H = actuals.shape[2]
    return np.where(np.stack([data.known[:, o : o + H] for o in origins], axis=1), actuals, np.nan)


def fit_window_offsets(model: ForecastModel, data: SeriesMatrix, origin: int, train: TrainSettings,
                       calibration: CalibrationSettings) -> HoldoutOffsets | None:
    """What ``rollcast backtest`` starts the calibration from, before test origin ``origin``: the offsets of
    ``model`` (:func:`window_offsets`) on the validation span of its fit (:func:`models.data.time_split`: data
    the fit did not train on), or without one the last ``max(4 H, 10%)`` steps before ``origin``."""
    cfg = model.config
    try:
        split = time_split(origin, cfg.context, cfg.horizon, train.validation_fraction)
        start = split.val[0] if split.val[1] > split.val[0] else origin - max(4 * cfg.horizon, origin // 10)
    except NotEnoughData:
        start = origin - max(4 * cfg.horizon, origin // 10)
    return window_offsets(model, data, start, origin, calibration.max_offset)


def forecastable(data: SeriesMatrix, origins: np.ndarray, context: int) -> np.ndarray:
    """``(S, n_origins)``: whether the context before each origin holds a known value (the gap rule,
    :func:`models.data.fill_gaps`, forecasts only those)."""
    return np.stack([known_any(data.contexts(o - context, o)) for o in origins], axis=1)


def rolling_origin(
    name: str,
    data: SeriesMatrix,
    *,
    n_origins: int,
    season: int,
    config: dict[str, Any] | None = None,
    refit_every: int | None = None,
    max_epochs: int = 20,
    batch_size: int = 256,
    seed: int = 0,
    patience: int = 5,
    on_origin: Callable[[int], None] | None = None,
    train: TrainSettings | None = None,
    calibration: CalibrationSettings | None = None,
    origin_every: int | None = None,
    burn_in: int = 0,
) -> BacktestResult:
    """Backtest model ``name`` (built with ``config`` through the registry) on ``data``.

    ``origin_every``: steps between origins (default H; :func:`origins_for`). ``refit_every`` counts
    origins, so a refit every ``refit_every * origin_every`` steps.
    Each fit draws its samples as a training cycle does (:func:`models.train.sampling.training_samples`) from
    ``train`` (default: the defaults of the ``train.*`` settings): ``train.samples_per_epoch`` pairs anew each
    epoch, a fixed draw of ``train.validation_samples`` from the last ``train.validation_fraction`` of the span
    before the origin, seeded by ``seed``.
    ``calibration``: calibrate the quantiles online over the origins as the forecast job does (see
    :func:`evaluate`); a refitted model is a new champion from its first origin on. ``burn_in``: the first
    origins left out of the coverages (:func:`evaluate`).
    """
    if refit_every is not None and refit_every < 0:
        raise ValueError(f"refit_every must be at least 1 (or 0/None: never), got {refit_every}")
    config = dict(config or {})
    train = TrainSettings() if train is None else train
    probe = create_model(name, **config)
    L, H = probe.config.context, probe.config.horizon
    origins = origins_for(data.values.shape[1], L, H, n_origins, origin_every)
    check_burn_in(burn_in, len(origins))
    fits: list[FitResult] = []
    forecasts = np.empty((len(data.series), len(origins), H, len(probe.config.quantiles)), dtype=np.float32)
    versions = np.zeros(len(origins), dtype=np.int64)  # which fit made each origin's forecasts
    # the origins each model serves: one segment without refits, else one per refit
    starts = [0]
    if probe.trainable and refit_every:
        starts = list(range(0, len(origins), refit_every))
    model = probe
    priors: dict[int, HoldoutOffsets | None] = {}  # the calibration's start offsets, per version
    for a, b in zip(starts, [*starts[1:], len(origins)], strict=True):
        if probe.trainable:
            model = create_model(name, **config)
            fits.append(_fit_before(model, data, int(origins[a]), max_epochs, batch_size, seed, patience, train))
        versions[a:b] = len(fits)
        if calibration is not None and calibration.enabled and calibration.start == "holdout":
            priors[len(fits)] = fit_window_offsets(model, data, int(origins[a]), train, calibration)
        for c in range(a, b, PROGRESS_ORIGINS):  # batched, in pieces so that a progress bar moves
            d = min(b, c + PROGRESS_ORIGINS)
            forecasts[:, c:d] = forecast_at(model, data, origins[c:d])
            if on_origin is not None:
                for i in range(c, d):
                    on_origin(i)
    return evaluate(probe, data, origins, season, forecasts=forecasts, name=name, fits=fits,
                    calibration=calibration, versions=versions, burn_in=burn_in, priors=priors)


PROGRESS_ORIGINS = 256  # origins forecast between two calls of rolling_origin's on_origin


def check_burn_in(burn_in: int, n_origins: int) -> None:
    """Raise :class:`NotEnoughData` unless ``0 <= burn_in < n_origins``: some origin is left to measure
    coverage on (``rollcast backtest`` checks it before reading the data, so it is the first error given)."""
    if not 0 <= burn_in < n_origins:
        raise NotEnoughData(f"a burn-in of {burn_in} origin(s) leaves none of the {n_origins} origin(s) to measure "
                            "coverage on; use a burn-in of 0 to fewer than --test-windows")


def evaluate(
    model: ForecastModel,
    data: SeriesMatrix,
    origins: np.ndarray,
    season: int,
    *,
    forecasts: np.ndarray | None = None,
    name: str | None = None,
    fits: list[FitResult] | None = None,
    calibration: CalibrationSettings | None = None,
    versions: np.ndarray | None = None,
    burn_in: int = 0,
    priors: dict[int, HoldoutOffsets | None] | None = None,
) -> BacktestResult:
    """Score ``model`` at ``origins`` against the actuals, with MAE relative to naive and seasonal
    naive (season ``season``) forecast at the same origins: the evaluation of `rollcast backtest` and of
    every training cycle's holdout.

    ``forecasts`` ``(S, n_origins, H, Q)``: the model's forecasts when the caller made them (a backtest
    that refits between origins); by default they are made here from the true history before each origin.

    ``calibration`` (enabled): the quantiles are also calibrated online, origin after origin, as the
    forecast job serves them (:func:`calibrate_sequentially`; ``versions`` and ``priors`` as there); the result holds them
    (``calibrated``) and the metrics add ``calibrated_coverage``, the coverage of their interval (q0.1-q0.9)
    (``coverage`` stays the model's own). The median is not moved: every other metric is unchanged.

    ``burn_in``: the first ``burn_in`` origins' forecasts are left out of ``coverage`` and
    ``calibrated_coverage`` (they still feed the calibration); every point metric (MAE, ..., relative
    MAE) stays over all origins. 0: every origin counts in both.
    """
    cfg = model.config
    H, qs = cfg.horizon, tuple(cfg.quantiles)
    if forecasts is None:
        forecasts = forecast_at(model, data, origins)
    actuals = np.stack([data.values[:, o : o + H] for o in origins], axis=1)
    baselines = {base: forecast_at(baseline(base, cfg.context, H, qs, season), data, origins) for base in BASELINES}
    insample = data.values[:, : int(origins[0])]
    check_burn_in(burn_in, len(origins))
    scores = score(forecasts, actuals, insample, season, cfg.median_index, baselines, burn_in, qs)
    measured = slice(burn_in, None)  # the origins the coverages count
    calibrated = None
    if calibration is not None and calibration.enabled:
        calibrated = calibrate_sequentially(forecasts, settled_actuals(data, origins, actuals), origins, qs, calibration, versions, priors,
                                            data.series)
        lo, hi = interval_indices(qs)
        scores["calibrated_coverage"] = M.coverage(actuals[:, measured], calibrated[:, measured, :, lo],
                                                   calibrated[:, measured, :, hi])
    return BacktestResult(name if name is not None else getattr(model, "name", ""), scores, forecasts, actuals,
                          origins, qs, data.series, list(fits or []), forecastable(data, origins, cfg.context),
                          calibrated, burn_in, [p for p in (priors or {}).values() if p is not None])


def calibrate_sequentially(
    forecasts: np.ndarray,
    actuals: np.ndarray,
    origins: np.ndarray,
    quantiles: tuple[float, ...] | list[float],
    calibration: CalibrationSettings,
    versions: np.ndarray | None = None,
    priors: dict[int, HoldoutOffsets | None] | None = None,
    series: list[str] | None = None,
) -> np.ndarray:
    """The quantiles the forecast job would have served ``(S, n_origins, H, Q)`` (float32, as it sends
    them), for the model's ``forecasts`` ``(S, n_origins, H, Q)`` made at ``origins`` (strictly increasing
    time indices), with ``actuals`` ``(S, n_origins, H)`` (NaN: a gap, which settles nothing).

    One :class:`~models.scoring.calibration.QuantileTracker` (row = series) with ``calibration``'s settings,
    as in :mod:`models.scoring.scorer`, started from ``priors[version]`` (the split-conformal offsets of the
    model that made the first origin's forecasts; ``series`` names the rows, for their own offsets) or
    from 0 without one. Step ``h`` (0-based) of the forecast made at origin
    ``o`` is the value at time index ``o + h``: the window that settles it. Time runs window by window:
    window ``t`` settles every forecast step ``(o, h)`` with ``o + h == t``, and a forecast at origin
    ``o'`` is served after window ``o' - 1`` has been settled (its context ends there). So the rule is:

        the quantiles served at origin o' are the model's plus the offsets after every settlement
        (o, h) with o + h < o', applied in the order of o + h, and no other.

    With origins at least H apart, every step of an origin has settled before the next origin; closer
    together, only the steps that have closed by then (the rest settle later, in time order). Each
    settlement uses the quantiles served for it, as live. ``versions`` ``(n_origins,)``: the model that
    made each origin's forecasts (a refit); from an origin whose version differs from the previous one,
    after the windows before it have settled, only that version's forecasts update the offsets, and
    ``calibration.on_new_champion == "reset"`` starts them again from that version's prior, as when the
    forecast job swaps champions.
    """
    forecasts = np.asarray(forecasts)
    S, n_origins, H, _ = forecasts.shape
    origins = np.asarray(origins, dtype=np.int64)
    if len(origins) != n_origins or (n_origins > 1 and (np.diff(origins) <= 0).any()):
        raise ValueError("origins must be strictly increasing, one per forecast origin")
    versions = np.zeros(n_origins, dtype=np.int64) if versions is None else np.asarray(versions)
    priors = priors or {}
    names = list(series) if series is not None else [str(i) for i in range(S)]
    tracker = QuantileTracker(list(quantiles), H, rows=S, prior=priors.get(int(versions[0])) if n_origins else None,
                              **calibration.tracker_options())
    rows = np.arange(S)
    tracker.reset(rows, names)
    served = np.empty(forecasts.shape, dtype=np.float32)
    # every forecast step (origin i, step h) and the time index that settles it, in time order
    event_i, event_h = np.divmod(np.arange(n_origins * H), H)
    event_t = origins[event_i] + event_h
    order = np.argsort(event_t, kind="stable")
    event_i, event_h, event_t = event_i[order], event_h[order], event_t[order]
    done = 0  # events[:done] are settled
    for i, origin in enumerate(origins):
        upto = int(np.searchsorted(event_t, origin, side="left"))  # settled by now: t < origin
        ei, eh = event_i[done:upto], event_h[done:upto]
        done = upto
        if i > 0:
            own = versions[ei] == versions[i - 1]  # forecasts of the model serving while they settle
            _settle(tracker, rows, ei[own], eh[own], forecasts, served, actuals)
            if versions[i] != versions[i - 1]:
                tracker.set_prior(priors.get(int(versions[i])))
                if calibration.on_new_champion == "reset":
                    tracker.reset(rows, names)
        served[:, i] = tracker.apply(rows, forecasts[:, i]).astype(np.float32)
    return served


def _settle(tracker: QuantileTracker, rows: np.ndarray, ei: np.ndarray, eh: np.ndarray, forecasts: np.ndarray,
            served: np.ndarray, actuals: np.ndarray) -> None:
    """Update ``tracker`` with the settled forecast steps ``(ei, eh)`` of every series: those whose windows
    closed between two consecutive origins. Origins are strictly increasing, so each step ``h`` settles
    at most one origin there (an update must not add two settlements of one offset before clipping),
    and the offsets of different steps are independent: one update is the same as one per window."""
    if not len(ei):
        return
    assert len(np.unique(eh)) == len(eh), "one settlement per horizon step between two origins"
    S, n = len(rows), len(ei)
    tracker.update(np.tile(rows, n), np.repeat(eh, S),
                   forecasts[:, ei, eh].transpose(1, 0, 2).reshape(n * S, -1).astype(np.float64),
                   served[:, ei, eh].transpose(1, 0, 2).reshape(n * S, -1).astype(np.float64),
                   actuals[:, ei, eh].T.reshape(n * S))


def baseline(name: str, context: int, horizon: int, quantiles: tuple[float, ...] | list[float],
             season: int) -> ForecastModel:
    """The baseline ``name`` (one of :data:`BASELINES`) for models of this context, horizon and quantiles."""
    return create_model(name, context=context, horizon=horizon, quantiles=list(quantiles), season=season)


def _fit_before(
    model: ForecastModel, data: SeriesMatrix, origin: int, max_epochs: int, batch_size: int, seed: int,
    patience: int, train: TrainSettings,
) -> FitResult:
    """Fit ``model`` on the targets before ``origin``, its samples drawn as a training cycle draws them."""
    cfg = model.config
    split = time_split(origin, cfg.context, cfg.horizon, train.validation_fraction)
    fit_set, val_set = training_samples(data, cfg, split.train, split.val, train, seed)
    return fit(model, fit_set, val_set, max_epochs=max_epochs, batch_size=batch_size, seed=seed, patience=patience)


def score(
    forecasts: np.ndarray,
    actuals: np.ndarray,
    insample: np.ndarray,
    season: int,
    median_index: int,
    baselines: dict[str, np.ndarray] | None = None,
    burn_in: int = 0,
    quantiles: tuple[float, ...] | list[float] | None = None,
) -> dict[str, float]:
    """Metrics of ``forecasts (S, O, H, Q)`` against ``actuals (S, O, H)``, averaged over origins and series
    (coverage without the first ``burn_in`` origins).

    MASE is averaged over series, each scaled by its own in-sample seasonal-naive MAE.
    """
    point = forecasts[..., median_index]
    lo, hi = (0, forecasts.shape[-1] - 1) if quantiles is None else interval_indices(quantiles)
    out = {
        "mae": M.mae(actuals, point),
        "rmse": M.rmse(actuals, point),
        "smape": M.smape(actuals, point),
        "mase": float(np.nanmean([
            M.mase(actuals[s], point[s], insample[s], season) for s in range(len(actuals))
        ])),
        "coverage": M.coverage(actuals[:, burn_in:], forecasts[:, burn_in:, :, lo], forecasts[:, burn_in:, :, hi]),
    }
    for base, fc in (baselines or {}).items():
        base_mae = M.mae(actuals, fc[..., median_index])
        out[f"rel_mae_{base}"] = out["mae"] / base_mae if base_mae > 0 else float("nan")
    return out
