"""Conformal calibration of forecast quantiles: offsets from the holdout at training time, then adapted
online, per series, horizon step and level.

A model's quantiles are learned on its training span; on new data they cover less than they claim (the
80% interval covered 0.48-0.70 of actuals on rolling-origin backtests of public data). Every served
quantile ``tau`` (other than the median) gets an offset ``c``, in units of the model's own outer interval
width ``w`` at that step (:func:`calibrate`)::

    served quantile  q~ = q + c * w

**Start calibrated (split conformal).** At training time the model forecasts the holdout (data it was not
fitted on) and :func:`holdout_offsets` takes, per horizon step and level, the conformal quantile of the
scores ``s = (y - q) / w``: the ``ceil((n + 1) tau)``-th smallest of ``n`` scores for an upper level, the
``floor((n + 1) tau)``-th for a lower one (the finite-sample correction of split conformal prediction,
Vovk et al. 2005; Lei et al. 2018; per quantile as in conformalized quantile regression, Romano et al.
2019). Per series where the holdout has :data:`MIN_SERIES_WINDOWS` windows of that series, pooled over
series otherwise. They travel with the model version (``calibration.json``) and start every series that
has no live state. On exchangeable data the served quantile then covers at least ``tau`` (upper levels)
or at most ``tau`` (lower levels) from the first forecast.

**Adapt fast, stay stable.** Online, each (series, step, level) runs the dynamically-tuned adaptive
conformal inference of Gibbs and Candès ("Conformal Inference for Online Prediction with Arbitrary
Distribution Shifts", JMLR 25, 2024, Algorithm 1, DtACI), written on the offset scale: ``K`` experts, each
an offset ``e_k`` tracked with its own step ``gamma_k`` (``calibration.expert_rates``)::

    e_k <- clip(e_k + gamma_k * h^-p * (tau - 1{s <= e_k}))

weighted by their recent pinball loss, summed over the levels of the (series, step) (the quantile score
of the set the expert's step size gives; one weight per expert and (series, step), shared by the levels),
``l_k = sum_tau rho_tau(s_tau - e_k,tau)``: ``p_k <- p_k exp(-beta l_k)``, normalised, then mixed with the uniform, ``p <- (1 - sigma) p + sigma / K`` (``calibration.weight_rate``
and ``calibration.mixing``; the mixing lets a slow expert take over again after a burst). A small step
is stable on a steady stream, a large one recovers from a shift within tens of windows, and the weights
move to whichever has been right lately. On 200 series whose model interval stays 0.4 times too narrow
and then sees the spread triple at once (the worst case: the model learns nothing), the 80% interval of
step 1 is back above 0.75 within 75 windows (``tests/models/scoring/test_calibration.py``); the single
fixed step of 0.05 used before this recovers markedly slower.

**Delayed feedback.** Step ``h`` of a forecast settles ``h`` windows after it is served, so ``h`` more
forecasts of that step are out before the first feedback on an offset arrives: an integrator with a
delay, which overshoots and oscillates when its gain times the delay is large (at 0.05 interval widths
per window and a 24-step horizon, intervals widened 1.4 times to cover what the model's own did, and a
guard of 0.2 made them three times as wide). Every step size of step ``h`` (1-based) is therefore divided
by ``h^p`` (``p = calibration.delay_exponent``, 0.5: between ignoring the delay and dividing by it).

**Shrink while young.** A series with few settled windows leans on the offsets of all series: with ``n``
windows of evidence (its holdout windows, when it was started from its own, plus those settled live),

    c = lam * (sum_k p_k e_k + g) + (1 - lam) * pooled,   lam = n / (n + n0)   (n0: calibration.shrink_windows)

``pooled`` are the model version's pooled holdout offsets (0 without them). They are not updated live,
so every served quantile depends only on its own series' windows, never on which other series a process
holds or how windows were batched (the forecast job's exactly-once re-sends rely on this).

**The long-run guarantee.** ``g`` is a guard: quantile tracking on the *served* quantile (the "P" control
of conformal PID, Angelopoulos, Candès and Tibshirani, NeurIPS 2023; adaptive conformal inference, Gibbs
and Candès, NeurIPS 2021), ``g <- g + eta_h * (tau - 1{y <= q~})`` with ``eta_h = eta * h^-p`` and
``eta = calibration.learning_rate``. Summing its updates, over any T settled windows of a (series, step h,
level),

    | share of actuals at or below q~  -  tau |  =  |g_T - g_0| / (eta_h T)

whatever the data do (no exchangeability needed; it holds under drift), as long as ``g`` was not clipped
at ``+-max_offset`` widths (it is only clipped when the served quantile sat ``max_offset`` model widths
away from where the actuals fell for a long stretch). ``g`` stays bounded because the experts and the
pooled offsets are clipped and a large ``g`` moves the served quantile past any actual (``lam > 0`` once
a window has settled), so the share converges to ``tau`` at rate ``1/T``. The experts make the finite-T
behaviour good; the guard makes the long run exact.

Why per series: the offsets then partition with the series over Kafka partitions (the forecast job can
run as several processes), every series gets the guarantee on its own, and series of different scales
or difficulties do not pull one another's intervals. Why in widths of the model's interval: the update
is scale-free (the same steps for prices in the thousands and sensors near 1), and the served interval
keeps the model's shape over the horizon and over time.

The median (the point forecast) is not moved. After the offsets, each quantile is kept at or beyond its
inner neighbour, outward from the median (a lower one at or below the next one up, an upper one at or
above the next one down). So each served quantile rises with its own offset and depends only on the
offsets of the levels inside it, and the guard above always sees its own level: sorting instead would
hand a level another level's value whenever two cross, and the two guards would then push each other
apart (a runaway that cut the live coverage of a bundled dataset from 0.80 to 0.74). The guard sees the
served (clamped) quantile, so its identity above is about what was served.

The same tracker serves the forecast job (``models.scoring.scorer``) and ``rollcast backtest``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.quantiles import interval_indices

# a model interval narrower than this share of the median's magnitude (or 1e-9 absolute) is taken as
# that wide, so offsets can still widen a collapsed interval
MIN_RELATIVE_WIDTH = 1e-6
# a series gets holdout offsets of its own when the holdout has at least this many windows of it (per
# step); else it starts from the pooled ones
MIN_SERIES_WINDOWS = 40
CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = 1

# defaults of the calibration.* settings (pipeline.config.CalibrationSettings)
EXPERT_RATES = (0.01, 0.05, 0.2)
GUARD_RATE = 0.05
DELAY_EXPONENT = 0.5
WEIGHT_RATE = 2.0
MIXING = 0.005
SHRINK_WINDOWS = 20.0
MAX_OFFSET = 20.0


def widths(preds: np.ndarray, median: int) -> np.ndarray:
    """The model's outer interval width ``(..., H)`` of quantiles ``(..., H, Q)``, floored
    (:data:`MIN_RELATIVE_WIDTH`): the unit of every offset."""
    lo, hi, mid = preds[..., 0], preds[..., -1], preds[..., median]
    return np.maximum(hi - lo, np.maximum(MIN_RELATIVE_WIDTH * np.abs(mid), 1e-9))


def scores_of(preds: np.ndarray, actual: np.ndarray, median: int) -> np.ndarray:
    """Conformity scores ``(..., H, Q)``: where each actual ``(..., H)`` fell from each model quantile, in
    model widths (the offset that would have put that quantile exactly on it)."""
    preds = np.asarray(preds, dtype=np.float64)
    return (np.asarray(actual, dtype=np.float64)[..., None] - preds) / widths(preds, median)[..., None]


def conformal_quantile(scores: np.ndarray, tau: float) -> float:
    """The split-conformal offset of level ``tau`` from ``n`` exchangeable ``scores``: the
    ``ceil((n+1) tau)``-th smallest for ``tau > 0.5`` (then ``P(s_new <= c) >= tau``), the
    ``floor((n+1) tau)``-th for ``tau < 0.5`` (then ``P(s_new <= c) <= tau``); NaN when that order
    statistic does not exist (too few scores for the level)."""
    s = np.sort(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    n = len(s)
    k = math.ceil((n + 1) * tau - 1e-9) if tau > 0.5 else math.floor((n + 1) * tau + 1e-9)
    if n == 0 or k < 1 or k > n:
        return float("nan")
    return float(s[k - 1])


@dataclass
class HoldoutOffsets:
    """Split-conformal offsets of one model version: ``pooled`` ``(H, Q)`` over all series, and per series
    with enough holdout windows, ``(H, Q)`` with their window count (0 at the median, always)."""

    FILE = CALIBRATION_FILE  # its name beside the saved model

    quantiles: list[float]
    horizon: int
    pooled: np.ndarray
    windows: int  # scored (series, origin) pairs per step behind the pooled offsets
    series: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    coverage: dict[str, float] = field(default_factory=dict)  # holdout coverage, raw and calibrated

    def for_series(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Start offsets ``(n, H, Q)`` of series ``names`` and their evidence in windows ``(n,)`` (0 for a
        series started from the pooled offsets)."""
        out = np.broadcast_to(self.pooled, (len(names), *self.pooled.shape)).copy()
        evidence = np.zeros(len(names))
        if self.series:
            for i, name in enumerate(names):
                own = self.series.get(name)
                if own is not None:
                    out[i], evidence[i] = own
        return out, evidence

    def to_json(self) -> str:
        return json.dumps({
            "format": CALIBRATION_FORMAT, "method": "split conformal, per horizon step, finite-sample corrected",
            "units": "model outer-interval widths (served = q + offset * (q_last - q_first))",
            "quantiles": self.quantiles, "horizon": self.horizon, "windows": self.windows,
            "coverage": self.coverage, "pooled": np.round(self.pooled, 6).tolist(),
            "series": {k: {"windows": int(n), "offsets": np.round(v, 6).tolist()} for k, (v, n) in self.series.items()},
        })

    @classmethod
    def from_json(cls, text: str) -> HoldoutOffsets:
        d = json.loads(text)
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"calibration offsets of format {d.get('format')!r}, expected {CALIBRATION_FORMAT}")
        return cls(list(d["quantiles"]), int(d["horizon"]), np.asarray(d["pooled"], dtype=np.float64),
                   int(d["windows"]),
                   {k: (np.asarray(v["offsets"], dtype=np.float64), int(v["windows"])) for k, v in d["series"].items()},
                   dict(d.get("coverage", {})))


def holdout_offsets(preds: np.ndarray, actuals: np.ndarray, series: Sequence[str], quantiles: Sequence[float],
                    max_offset: float = MAX_OFFSET, min_series_windows: int = MIN_SERIES_WINDOWS) -> HoldoutOffsets:
    """:class:`HoldoutOffsets` from the model's forecasts ``(S, n_origins, H, Q)`` of a holdout and its actuals
    ``(S, n_origins, H)`` (NaN: unknown, left out), for series ``series``.

    Per step and level, the split-conformal offset (:func:`conformal_quantile`) of the pooled scores, and
    of each series' own where it has ``min_series_windows`` known windows at every step (at a level whose
    offset does not exist for so few windows, the pooled one). A pooled offset that does not exist (too few windows for the level) is 0,
    the model's own quantile; every offset is clipped to ``+-max_offset``."""
    q = [float(x) for x in quantiles]
    median = q.index(0.5)
    S, n_origins, H, Q = preds.shape
    scores = scores_of(preds, actuals, median)  # (S, n_origins, H, Q)
    pooled = np.zeros((H, Q))
    for h in range(H):
        for j, tau in enumerate(q):
            if j != median:
                c = conformal_quantile(scores[:, :, h, j].ravel(), tau)
                pooled[h, j] = 0.0 if np.isnan(c) else c
    own: dict[str, tuple[np.ndarray, int]] = {}
    known = np.isfinite(np.asarray(actuals, dtype=np.float64))  # (S, n_origins, H)
    for i, name in enumerate(series):
        n = int(known[i].sum(axis=0).min()) if n_origins else 0
        if n < min_series_windows:
            continue
        offs = np.zeros((H, Q))
        for h in range(H):
            for j, tau in enumerate(q):
                if j != median:
                    offs[h, j] = conformal_quantile(scores[i, :, h, j], tau)
        # a level whose order statistic does not exist for this series (a 0.99 quantile needs 99 windows)
        # takes the pooled offset
        offs = np.where(np.isfinite(offs), offs, pooled)
        own[str(name)] = (np.clip(offs, -max_offset, max_offset), n)
    windows = int(known.sum(axis=(0, 1)).min()) if S and n_origins else 0
    return HoldoutOffsets(q, H, np.clip(pooled, -max_offset, max_offset), windows, own)


def holdout_coverage(preds: np.ndarray, actuals: np.ndarray, series: Sequence[str], quantiles: Sequence[float],
                     max_offset: float = MAX_OFFSET) -> dict[str, float]:
    """Coverage of the interval (:func:`pipeline.quantiles.interval_indices`) on a holdout ``(S, O, H, Q)``: the model's own (``raw``) and, honestly
    out of sample, ``calibrated`` with offsets from the first half of the origins applied to the second
    half (the offsets a model version ships are from all of them)."""
    q = list(quantiles)
    median = q.index(0.5)
    lo, hi = interval_indices(q)
    actuals = np.asarray(actuals, dtype=np.float64)
    known = np.isfinite(actuals)

    def cover(p: np.ndarray, y: np.ndarray, k: np.ndarray) -> float:
        inside = (p[..., lo] <= y) & (y <= p[..., hi])
        return float(inside[k].mean()) if k.any() else float("nan")

    out = {"raw": cover(np.asarray(preds, dtype=np.float64), actuals, known)}
    half = preds.shape[1] // 2
    if half >= 1:
        first = holdout_offsets(preds[:, :half], actuals[:, :half], series, q, max_offset)
        offs, _ = first.for_series(series)
        served = calibrate(np.asarray(preds[:, half:], dtype=np.float64), offs[:, None], median)
        out["calibrated_second_half"] = cover(served, actuals[:, half:], known[:, half:])
        out["raw_second_half"] = cover(np.asarray(preds[:, half:], dtype=np.float64), actuals[:, half:],
                                       known[:, half:])
    return out


class QuantileTracker:
    """Online offsets of the served quantiles, one row per series (module docstring): ``K`` experts with
    their weights, the guard and the evidence per (row, step), and the pooled holdout offsets."""

    def __init__(self, quantiles: Sequence[float], horizon: int, learning_rate: float = GUARD_RATE,
                 max_offset: float = MAX_OFFSET, rows: int = 0, *, expert_rates: Sequence[float] = EXPERT_RATES,
                 weight_rate: float = WEIGHT_RATE, mixing: float = MIXING, shrink_windows: float = SHRINK_WINDOWS,
                 delay_exponent: float = DELAY_EXPONENT, prior: HoldoutOffsets | None = None):
        self.quantiles = np.asarray(quantiles, dtype=np.float64)
        if 0.5 not in quantiles:
            raise ValueError("quantiles must include 0.5 (the point forecast)")
        self.median = list(quantiles).index(0.5)
        self.horizon = int(horizon)
        self.learning_rate = float(learning_rate)
        self.max_offset = float(max_offset)
        self.rates = np.asarray(expert_rates, dtype=np.float64)
        if not len(self.rates):
            raise ValueError("at least one expert step size")
        self.weight_rate, self.mixing = float(weight_rate), float(mixing)
        self.shrink_windows = float(shrink_windows)
        # every step size of horizon step h (1-based) divided by h ** delay_exponent (module docstring)
        self.step_scale = (np.arange(self.horizon) + 1.0) ** -float(delay_exponent)
        self.levels = np.where(np.arange(len(self.quantiles)) == self.median, 0.0, 1.0)  # 0: the median
        H, Q, K = self.horizon, len(self.quantiles), len(self.rates)
        self.experts = np.zeros((0, H, Q, K))
        self.weights = np.zeros((0, H, K))  # shared by the levels of a (row, step)
        self.guard = np.zeros((0, H, Q))
        # sum_k p_k e_k + g of every (row, step, level): derived from the three above, kept up to date where
        # they change, so that serving reads one array instead of mixing every expert again
        self.own = np.zeros((0, H, Q))
        self.evidence = np.zeros((0, H))  # windows behind each row's own offsets: holdout + settled live
        self.updates = np.zeros((0, H), dtype=np.int64)  # settled windows seen live per step
        self.prior = prior
        self.pooled = np.zeros((H, Q))
        self.set_prior(prior)
        self.grow(rows)

    # ------------------------------------------------------------------ rows and priors

    @property
    def rows(self) -> int:
        return len(self.guard)

    def set_prior(self, prior: HoldoutOffsets | None) -> None:
        """The holdout offsets new and reset rows start from, and the pooled offsets restart at."""
        if prior is not None and (list(prior.quantiles) != self.quantiles.tolist() or prior.horizon != self.horizon):
            raise ValueError("holdout offsets of other quantiles or another horizon")
        self.prior = prior
        self.pooled = np.zeros((self.horizon, len(self.quantiles))) if prior is None else prior.pooled.copy()

    def grow(self, rows: int) -> None:
        """Make room for at least ``rows`` rows (new ones start at the pooled offsets, no evidence)."""
        if rows > self.rows:
            have = self.rows
            extra = max(rows, 2 * have, 64) - have
            self.experts = np.concatenate([self.experts, np.zeros((extra, *self.experts.shape[1:]))])
            self.weights = np.concatenate([self.weights, np.zeros((extra, *self.weights.shape[1:]))])
            self.guard = np.concatenate([self.guard, np.zeros((extra, *self.guard.shape[1:]))])
            self.own = np.concatenate([self.own, np.zeros((extra, *self.own.shape[1:]))])
            self.evidence = np.concatenate([self.evidence, np.zeros((extra, self.horizon))])
            self.updates = np.concatenate([self.updates, np.zeros((extra, self.horizon), dtype=np.int64)])
            self.reset(np.arange(have, have + extra))

    def reset(self, rows: np.ndarray | None = None, names: Sequence[str] | None = None) -> None:
        """Rows (all, or ``rows``) back to where a series without live state starts: the prior's offsets
        for series ``names`` (its own where it has them, else the pooled ones), or 0 without a prior."""
        idx = np.arange(self.rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if names is not None and self.prior is not None:
            start, evidence = self.prior.for_series(names)
        else:
            start = np.broadcast_to(self.pooled if self.prior is None else self.prior.pooled,
                                    (len(idx), self.horizon, len(self.quantiles)))
            evidence = np.zeros(len(idx))
        self.experts[idx] = start[..., None]
        self.weights[idx] = 1.0 / len(self.rates)
        self.guard[idx] = 0.0
        self.evidence[idx] = np.asarray(evidence, dtype=np.float64)[:, None]
        self.updates[idx] = 0
        self._mix(idx)

    def _mix(self, rows: np.ndarray) -> None:
        """Recompute :attr:`own` of ``rows`` from the experts, weights and guard."""
        self.own[rows] = _mixed(self.experts[rows], self.weights[rows], self.guard[rows])

    # ------------------------------------------------------------------ state (the forecast job's checkpoint)

    STATE = ("experts", "weights", "guard", "evidence", "updates")

    def state(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of ``rows``' arrays, by name (:attr:`STATE`)."""
        return {f"cal_{k}": getattr(self, k)[rows] for k in self.STATE}

    def load_state(self, rows: np.ndarray, arrays: Any) -> bool:
        """Put saved arrays (:meth:`state`) in ``rows``; False (rows untouched) when they are of another
        shape (other expert steps)."""
        if any(f"cal_{k}" not in arrays or arrays[f"cal_{k}"].shape[1:] != getattr(self, k).shape[1:]
               for k in self.STATE):
            return False
        for k in self.STATE:
            getattr(self, k)[rows] = arrays[f"cal_{k}"]
        self._mix(rows)
        return True

    def load_offsets(self, rows: np.ndarray, offsets: np.ndarray, updates: np.ndarray) -> None:
        """Put the state of a single-offset tracker (scoring state format 1: offsets ``(n, H, Q)`` and settled
        windows ``(n, H)``) in ``rows``: every expert starts from the offset, weights uniform, the guard at 0,
        the settled windows as the evidence."""
        self.experts[rows] = np.asarray(offsets, dtype=np.float64)[..., None]
        self.weights[rows] = 1.0 / len(self.rates)
        self.guard[rows] = 0.0
        self.evidence[rows] = updates
        self.updates[rows] = updates
        self._mix(rows)

    # ------------------------------------------------------------------ serving and settling

    def served_offsets(self, rows: np.ndarray) -> np.ndarray:
        """The offsets served for ``rows`` ``(n, H, Q)`` (module docstring)."""
        own = self.own[rows]
        n = self.evidence[rows][..., None]
        lam = n / (n + self.shrink_windows) if self.shrink_windows > 0 else np.ones_like(n)
        return (lam * own + (1.0 - lam) * self.pooled) * self.levels

    @property
    def offsets(self) -> np.ndarray:
        """The served offsets of every row ``(rows, H, Q)``."""
        return self.served_offsets(np.arange(self.rows))

    def apply(self, rows: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """Served quantiles ``(B, H, Q)`` for the model's ``preds`` ``(B, H, Q)`` of series ``rows``."""
        preds = np.asarray(preds, dtype=np.float64)
        return calibrate(preds, self.served_offsets(np.asarray(rows))[:, : preds.shape[1]], self.median)

    def update(self, rows: np.ndarray, steps: np.ndarray, model_q: np.ndarray, served: np.ndarray,
               actual: np.ndarray) -> None:
        """Settle ``len(rows)`` forecasts: series ``rows``, 0-based horizon ``steps``, the model's quantiles
        ``(N, Q)`` and those served ``(N, Q)`` for that step, and the actual ``(N,)``. NaN actuals (gap
        windows) are skipped. A (row, step) given more than once is updated once per occurrence, in order."""
        actual = np.asarray(actual, dtype=np.float64)
        model_q = np.asarray(model_q, dtype=np.float64)
        served = np.asarray(served, dtype=np.float64)
        known = np.isfinite(actual) & np.isfinite(served).all(axis=1) & np.isfinite(model_q).all(axis=1)
        if not known.any():
            return
        rows, steps = np.asarray(rows, dtype=np.int64)[known], np.asarray(steps, dtype=np.int64)[known]
        actual, model_q, served = actual[known], model_q[known], served[known]
        cell = rows * self.horizon + steps
        if np.bincount(cell).max() == 1:  # the forecast job's case: each (row, step) once
            self._update(rows, steps, model_q, served, actual)
            return
        order = np.argsort(cell, kind="stable")  # repeated cells: the k-th occurrence of each in round k
        sorted_cell = cell[order]
        first = np.r_[True, sorted_cell[1:] != sorted_cell[:-1]]
        starts = np.maximum.accumulate(np.where(first, np.arange(len(cell)), 0))
        occurrence = np.empty(len(cell), dtype=np.int64)
        occurrence[order] = np.arange(len(cell)) - starts
        for k in range(int(occurrence.max()) + 1):
            i = np.flatnonzero(occurrence == k)
            self._update(rows[i], steps[i], model_q[i], served[i], actual[i])

    def _update(self, rows: np.ndarray, steps: np.ndarray, model_q: np.ndarray, served: np.ndarray,
                actual: np.ndarray) -> None:
        """One settlement per (row, step) in ``rows, steps`` (distinct cells): on flat views of the state,
        one gather and one scatter per array (the forecast job settles H cells per series and batch)."""
        tau, levels, M = self.quantiles, self.levels, self.max_offset
        H, Q, K = self.horizon, len(tau), len(self.rates)
        cell = rows * H + steps
        experts = self.experts.reshape(-1, Q, K)  # views: the arrays are contiguous
        weights = self.weights.reshape(-1, K)
        guard = self.guard.reshape(-1, Q)
        s = scores_of(model_q, actual, self.median)  # (N, Q)
        e = experts[cell]  # (N, Q, K) copies
        d = s[..., None] - e
        g = tau[None, :, None] - (d <= 0)  # tau - 1{s <= e_k}: the step's sign and the pinball slope
        # each expert's pinball loss rho_tau(s - e_k), summed over the levels (the median's is 0): the
        # quantile score of the set it serves
        loss = np.einsum("nqk,nqk,q->nk", d, g, levels)
        f = self.step_scale[steps][:, None, None]  # (N, 1, 1)
        e += (self.rates * levels[:, None]) * g * f
        np.clip(e, -M, M, out=e)
        experts[cell] = e
        loss -= loss.min(-1, keepdims=True)
        loss *= -self.weight_rate
        w = weights[cell] * np.exp(loss, out=loss)
        w *= (1.0 - self.mixing) / w.sum(-1, keepdims=True)
        w += self.mixing / K
        weights[cell] = w
        covered = actual[:, None] <= served  # (N, Q): at or below the served quantile
        gd = np.clip(guard[cell] + self.learning_rate * f[:, :, 0] * levels * (tau - covered), -M, M)
        guard[cell] = gd
        self.own.reshape(-1, Q)[cell] = _mixed(e, w, gd)
        self.evidence.reshape(-1)[cell] += 1.0
        self.updates.reshape(-1)[cell] += 1


def _mixed(experts: np.ndarray, weights: np.ndarray, guard: np.ndarray) -> np.ndarray:
    """``sum_k p_k e_k + g``: experts ``(..., Q, K)``, weights ``(..., K)`` (shared by the levels), guard
    ``(..., Q)``."""
    return (experts * weights[..., None, :]).sum(-1) + guard


def calibrate(preds: np.ndarray, offsets: np.ndarray, median: int) -> np.ndarray:
    """``preds + offsets * width``, each quantile at or beyond its inner neighbour outward from the median
    (``preds`` and ``offsets`` broadcast over ``(..., H, Q)``)."""
    out = preds + offsets * widths(preds, median)[..., None]
    out[..., median] = preds[..., median]
    # outward from the median, not a sort (module docstring: a sort lets the guards run away)
    out[..., median::-1] = np.minimum.accumulate(out[..., median::-1], axis=-1)
    out[..., median:] = np.maximum.accumulate(out[..., median:], axis=-1)
    return out
