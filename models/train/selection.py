"""Which trained model may serve: the validation of a candidate and the promotion decision, as pure
functions of its holdout metrics.

A candidate is one model trained in a cycle. :func:`validation_failure` says why it must never serve
(non-finite losses, metrics or forecasts); :func:`decide` picks the one to promote: the lowest holdout
MAE among those that passed validation and beat the seasonal-naive baseline and the current champion
(by the relative margin ``train.min_improvement``) on the same origins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from models.tracking.tags import CYCLE_FULL, HOLDOUT_MAE

if TYPE_CHECKING:
    from models.base import ForecastModel
    from models.train.backtest import BacktestResult


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
    cycle_kind: str = CYCLE_FULL  # or CYCLE_WARM
    parent_version: str | None = None  # the version a warm cycle fine-tuned
    warm_cycles: int = 0
    # split-conformal offsets from the holdout (models.scoring.calibration.HoldoutOffsets), saved with the
    # version for the forecast job to start its calibration from
    calibration: Any = None

    @property
    def mae(self) -> float:
        return self.metrics[HOLDOUT_MAE]


def validation_failure(cand: Candidate) -> str | None:
    """Why ``cand`` must never serve (non-finite losses, metrics or forecasts), or None."""
    bad_losses = [f"{name}[{i}]={v}" for name, losses in (("train_loss", cand.train_loss), ("val_loss", cand.val_loss))
                  for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad_losses:
        return "non-finite loss: " + ", ".join(bad_losses[:5])
    bad = [k for k in ("holdout_mae", "holdout_rmse", "holdout_smape") if not math.isfinite(cand.metrics.get(k, math.nan))]
    if bad:
        return "non-finite holdout metric(s): " + ", ".join(f"{k}={cand.metrics.get(k)}" for k in bad)
    finite = np.isfinite(cand.backtest.forecasts).all(axis=(2, 3))  # (S, n_origins)
    served = cand.backtest.forecastable if cand.backtest.forecastable is not None else np.ones_like(finite)
    if not finite[served].all():  # contexts without a known value are not forecast (the gap rule)
        return "non-finite forecasts on the holdout"
    return None


# MAEs equal up to float rounding are a tie, and a tie keeps the incumbent: a model that learned nothing
# (no epoch beat its untrained start) forecasts seasonal naive itself, and which of the two MAEs comes out
# lower in the 8th digit depends on the CPU's rounding.
TIE_TOLERANCE = 1e-6


def decide(
    candidates: list[Candidate],
    baseline_mae: float,
    champion_mae: float | None,
    min_improvement: float,
) -> Candidate | None:
    """Set every candidate's ``decision``; return the one to promote (the lowest eligible MAE), if any.

    Eligible: passed validation, MAE below the seasonal-naive MAE, and (when a
    champion was scored) MAE below ``champion_mae * (1 - min_improvement)``; "below" by more than
    :data:`TIE_TOLERANCE` (relative) in both.
    """
    eligible = []
    for c in candidates:
        if c.failure:
            c.decision = f"not promoted: failed validation ({c.failure})"
        elif not c.mae < baseline_mae * (1 - TIE_TOLERANCE):
            c.decision = f"not promoted: MAE {c.mae:.6g} does not beat seasonal naive {baseline_mae:.6g}"
        elif champion_mae is not None and not c.mae < champion_mae * (1 - max(min_improvement, TIE_TOLERANCE)):
            c.decision = (f"not promoted: MAE {c.mae:.6g} does not beat the champion's {champion_mae:.6g} "
                          f"by the margin {min_improvement:g}")
        else:
            eligible.append(c)
    best = min(eligible, key=lambda c: c.mae) if eligible else None
    for c in eligible:
        c.decision = "promoted" if c is best else f"not promoted: {best.model_type} is better this cycle"
    return best
