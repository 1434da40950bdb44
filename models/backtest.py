"""Rolling-origin evaluation, through the same :func:`models.predict` path as live forecasting.

The model is fitted on the steps before the first test origin (optionally
refitted every ``refit_every`` origins on everything before that origin).
Origins are spaced H steps apart through the last ``n_origins * H`` steps; at
each one the model forecasts the next H steps from the true history up to the
origin. Metrics are averaged over all origins and series; relative MAE divides
by the MAE of naive and seasonal-naive forecasts at the same origins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models import metrics as M
from models.base import ForecastModel
from models.data import SeriesMatrix, known_any, make_samples, time_split
from models.io import predict
from models.registry import create_model
from models.training import FitResult, fit
from pipeline.errors import NotEnoughData

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


def origins_for(n_steps: int, context: int, horizon: int, n_origins: int) -> np.ndarray:
    """Time indices of the origins: every H steps through the last ``n_origins * H`` steps."""
    first = n_steps - n_origins * horizon
    if n_origins < 1 or first < context + horizon:
        raise NotEnoughData(
            f"{n_steps} steps per series are too few for {n_origins} test window(s) of {horizon} steps "
            f"after a context of {context} and some training data; use fewer --test-windows or a "
            "shorter --context/--horizon"
        )
    return first + horizon * np.arange(n_origins)


def forecast_at(model: ForecastModel, data: SeriesMatrix, origins: np.ndarray) -> np.ndarray:
    """Forecasts ``(S, n_origins, H, Q)`` from the true history before each origin."""
    L = model.config.context
    out = [predict(model, data.contexts(o - L, o), data.window_end_ms[o - L : o]) for o in origins]
    return np.stack(out, axis=1)


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
    val_fraction: float = 0.1,
    patience: int = 5,
    on_origin: Callable[[int], None] | None = None,
    train_stride: int = 1,
) -> BacktestResult:
    """Backtest model ``name`` (built with ``config`` through the registry) on ``data``.

    ``train_stride`` > 1 keeps every ``train_stride``-th training sample (cheaper epochs on long series).
    """
    config = dict(config or {})
    probe = create_model(name, **config)
    L, H = probe.config.context, probe.config.horizon
    origins = origins_for(data.values.shape[1], L, H, n_origins)
    fits: list[FitResult] = []
    per_origin: list[np.ndarray] = []
    model = probe
    for i, origin in enumerate(origins):
        if probe.trainable and (i == 0 or (refit_every and i % refit_every == 0)):
            model = create_model(name, **config)
            fits.append(_fit_before(model, data, int(origin), max_epochs, batch_size, seed, val_fraction, patience,
                                    train_stride))
        per_origin.append(forecast_at(model, data, origins[i : i + 1]))
        if on_origin is not None:
            on_origin(i)
    forecasts = np.concatenate(per_origin, axis=1)
    return evaluate(probe, data, origins, season, forecasts=forecasts, name=name, fits=fits)


def evaluate(
    model: ForecastModel,
    data: SeriesMatrix,
    origins: np.ndarray,
    season: int,
    *,
    forecasts: np.ndarray | None = None,
    name: str | None = None,
    fits: list[FitResult] | None = None,
) -> BacktestResult:
    """Score ``model`` at ``origins`` against the actuals, with MAE relative to naive and seasonal
    naive (season ``season``) forecast at the same origins: the evaluation of `rollcast backtest` and of
    every training cycle's holdout.

    ``forecasts`` ``(S, n_origins, H, Q)``: the model's forecasts when the caller made them (a backtest
    that refits between origins); by default they are made here from the true history before each origin.
    """
    cfg = model.config
    H, qs = cfg.horizon, tuple(cfg.quantiles)
    if forecasts is None:
        forecasts = forecast_at(model, data, origins)
    actuals = np.stack([data.values[:, o : o + H] for o in origins], axis=1)
    baselines = {base: forecast_at(baseline(base, cfg.context, H, qs, season), data, origins) for base in BASELINES}
    insample = data.values[:, : int(origins[0])]
    scores = score(forecasts, actuals, insample, season, cfg.median_index, baselines)
    return BacktestResult(name if name is not None else getattr(model, "name", ""), scores, forecasts, actuals,
                          origins, qs, data.series, list(fits or []), forecastable(data, origins, cfg.context))


def baseline(name: str, context: int, horizon: int, quantiles: tuple[float, ...] | list[float],
             season: int) -> ForecastModel:
    """The baseline ``name`` (one of :data:`BASELINES`) for models of this context, horizon and quantiles."""
    return create_model(name, context=context, horizon=horizon, quantiles=list(quantiles), season=season)


def _fit_before(
    model: ForecastModel, data: SeriesMatrix, origin: int, max_epochs: int, batch_size: int, seed: int,
    val_fraction: float, patience: int, train_stride: int = 1,
) -> FitResult:
    cfg = model.config
    split = time_split(origin, cfg.context, cfg.horizon, val_fraction)
    train = make_samples(data, cfg.context, cfg.horizon, split.train, cfg.calendar, stride=train_stride)
    val = make_samples(data, cfg.context, cfg.horizon, split.val, cfg.calendar)
    return fit(model, train, val, max_epochs=max_epochs, batch_size=batch_size, seed=seed, patience=patience)


def score(
    forecasts: np.ndarray,
    actuals: np.ndarray,
    insample: np.ndarray,
    season: int,
    median_index: int,
    baselines: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Metrics of ``forecasts (S, O, H, Q)`` against ``actuals (S, O, H)``, averaged over origins and series.

    MASE is averaged over series, each scaled by its own in-sample seasonal-naive MAE.
    """
    point = forecasts[..., median_index]
    out = {
        "mae": M.mae(actuals, point),
        "rmse": M.rmse(actuals, point),
        "smape": M.smape(actuals, point),
        "mase": float(np.nanmean([
            M.mase(actuals[s], point[s], insample[s], season) for s in range(len(actuals))
        ])),
        "coverage": M.coverage(actuals, forecasts[..., 0], forecasts[..., -1]),
    }
    for base, fc in (baselines or {}).items():
        base_mae = M.mae(actuals, fc[..., median_index])
        out[f"rel_mae_{base}"] = out["mae"] / base_mae if base_mae > 0 else float("nan")
    return out
