"""Calibration (models.scoring.calibration): holdout offsets against an independent split-conformal
computation, the online tracker against an independent plain-Python one, the long-run bound its docstring
states, and recovery from an abrupt scale shift.

The docstring's guarantee: the guard ``g`` moves by ``eta * (tau - 1{y <= q~})`` at every settled
window, so over any T windows the share of actuals at or below the served quantile ``q~`` is ``tau`` up
to ``|g_T - g_0| / (eta T)``, for each series, step and level, whatever the data do (while ``g`` is not
clipped). Checked on a random stream with a level and spread shift, on which the model's own quantiles
are far off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.scoring.calibration import (
    HoldoutOffsets,
    QuantileTracker,
    calibrate,
    conformal_quantile,
    holdout_coverage,
    holdout_offsets,
)

QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]
MEDIAN = QUANTILES.index(0.5)
ETA, MAX_OFFSET = 0.05, 20.0
RATES = (0.01, 0.1, 1.0)
BETA, SIGMA, N0 = 2.0, 0.005, 20.0
DELAY = 0.5  # step sizes of horizon step h divided by h ** DELAY
ROWS, H, T = 3, 2, 3000


def reference_served(pred: list[float], offsets: list[float]) -> list[float]:
    """The served quantiles of one (series, step), as the docstring describes them, one number at a time."""
    lo, hi, mid = pred[0], pred[-1], pred[MEDIAN]
    width = max(hi - lo, max(1e-6 * abs(mid), 1e-9))
    out = [q + c * width for q, c in zip(pred, offsets, strict=True)]
    out[MEDIAN] = mid
    for j in range(MEDIAN - 1, -1, -1):  # outward from the median, each at or beyond its inner neighbour
        out[j] = min(out[j], out[j + 1])
    for j in range(MEDIAN + 1, len(out)):
        out[j] = max(out[j], out[j - 1])
    return out


class ReferenceCell:
    """One (series, step) of the tracker in plain Python, from the module docstring: per level, experts
    with their weights (DtACI), a guard, and the shrinkage towards the pooled offsets."""

    def __init__(self, start: list[float], evidence: float, pooled: list[float], quantiles=QUANTILES, *,
                 rates=RATES, beta=BETA, sigma=SIGMA, n0=N0, eta=ETA, max_offset=MAX_OFFSET, step=1, delay=DELAY):
        self.q, self.median = list(quantiles), list(quantiles).index(0.5)
        scale = step**-delay  # horizon step `step` (1-based) learns that much slower
        rates, eta = [r * scale for r in rates], eta * scale
        self.rates, self.beta, self.sigma, self.n0, self.eta, self.max = rates, beta, sigma, n0, eta, max_offset
        self.e = [[c] * len(rates) for c in start]
        self.p = [1.0 / len(rates)] * len(rates)  # shared by the levels
        self.g = [0.0 for _ in start]
        self.n = evidence
        self.pooled = pooled

    def offsets(self) -> list[float]:
        lam = self.n / (self.n + self.n0) if self.n0 > 0 else 1.0
        out = []
        for j in range(len(self.q)):
            own = sum(p * e for p, e in zip(self.p, self.e[j], strict=True)) + self.g[j]
            out.append(0.0 if j == self.median else lam * own + (1 - lam) * self.pooled[j])
        return out

    def update(self, pred: list[float], served: list[float], y: float) -> None:
        width = max(pred[-1] - pred[0], max(1e-6 * abs(pred[self.median]), 1e-9))
        losses = [0.0] * len(self.rates)  # each expert's pinball loss, summed over the levels
        for j, tau in enumerate(self.q):
            if j == self.median:
                continue
            s = (y - pred[j]) / width
            for k, e in enumerate(self.e[j]):
                losses[k] += max(tau * (s - e), (tau - 1) * (s - e))
            self.e[j] = [min(max(e + r * (tau - (s <= e)), -self.max), self.max)
                         for e, r in zip(self.e[j], self.rates, strict=True)]
            self.g[j] = min(max(self.g[j] + self.eta * (tau - (y <= served[j])), -self.max), self.max)
        w = [p * math.exp(-self.beta * (loss - min(losses))) for p, loss in zip(self.p, losses, strict=True)]
        self.p = [(1 - self.sigma) * x / sum(w) + self.sigma / len(self.rates) for x in w]
        self.n += 1


def tracker(rows: int, horizon: int, prior: HoldoutOffsets | None = None, quantiles=QUANTILES) -> QuantileTracker:
    return QuantileTracker(quantiles, horizon, ETA, MAX_OFFSET, rows=rows, expert_rates=RATES, weight_rate=BETA,
                           mixing=SIGMA, shrink_windows=N0, delay_exponent=DELAY, prior=prior)


def stream(seed: int = 0):
    """Per window: model quantiles (ROWS, H, Q), too narrow and biased, and actuals (ROWS, H) whose level
    and spread shift half-way (no exchangeability)."""
    rng = np.random.default_rng(seed)
    z = np.array([-1.645, -0.674, 0.0, 0.674, 1.645])
    for t in range(T):
        shift, sd = (0.0, 1.0) if t < T // 2 else (3.0, 2.5)
        level = 10.0 * np.arange(1, ROWS + 1)[:, None] + np.zeros((ROWS, H))
        preds = level[..., None] + 0.3 * z  # the model claims sd 0.3, around the old level
        actual = level + shift + rng.normal(0.0, sd, (ROWS, H))
        yield preds, actual


def test_long_run_coverage_matches_the_docstring_bound_and_an_independent_tracker() -> None:
    pooled = [0.1, 0.05, 0.0, -0.05, -0.1]
    prior = HoldoutOffsets(QUANTILES, H, np.tile(pooled, (H, 1)), 100)
    tr = tracker(ROWS, H, prior)
    tr.reset(np.arange(ROWS), [f"s{r}" for r in range(ROWS)])  # no series of its own: the pooled start
    ref = [[ReferenceCell(pooled, 0.0, pooled, step=h + 1) for h in range(H)] for _ in range(ROWS)]
    below = np.zeros((ROWS, H, len(QUANTILES)))  # actuals at or below the served quantile
    model_below = np.zeros((ROWS, H, len(QUANTILES)))
    rows = np.repeat(np.arange(ROWS), H)
    steps = np.tile(np.arange(H), ROWS)
    for preds, actual in stream():
        served = tr.apply(np.arange(ROWS), preds)  # (ROWS, H, Q)
        for r in range(ROWS):
            for h in range(H):
                want = reference_served(preds[r, h].tolist(), ref[r][h].offsets())
                assert served[r, h].tolist() == pytest.approx(want, rel=1e-9, abs=1e-9)
                y = float(actual[r, h])
                below[r, h] += [y <= w for w in want]
                model_below[r, h] += y <= preds[r, h]
                ref[r][h].update(preds[r, h].tolist(), served[r, h].tolist(), y)
        tr.update(rows, steps, preds.reshape(ROWS * H, -1), served.reshape(ROWS * H, -1), actual.reshape(-1))

    np.testing.assert_allclose(tr.guard[:ROWS], [[c.g for c in row] for row in ref], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(tr.experts[:ROWS], [[c.e for c in row] for row in ref], rtol=1e-9, atol=1e-9)
    assert (tr.updates[:ROWS] == T).all()
    assert np.abs(tr.guard[:ROWS]).max() < MAX_OFFSET  # never clipped: the identity is exact here
    share = below / T
    tau = np.array(QUANTILES)
    outer = [j for j in range(len(QUANTILES)) if j != MEDIAN]
    # the guard's identity: sum of (tau - hit) = (g_T - g_0) / eta_h, so share - tau = (g_T - g_0) / (eta_h T)
    eta = ETA * (np.arange(H) + 1.0) ** -DELAY  # of each horizon step
    np.testing.assert_allclose((tau - share)[..., outer] * T * eta[:, None], tr.guard[:ROWS][..., outer],
                               rtol=1e-9, atol=1e-9)
    gap = np.abs(share - tau)[..., outer]
    # small, though a lower quantile cannot rise above the model's median (nor an upper one fall below
    # it), and after the shift the actuals sit above the old median: there the guard grows (the 0.25
    # level's gap) and no offset can close it
    assert gap.max() < 0.1, gap
    assert gap[..., [0, 2, 3]].max() < 0.02, gap
    # the model's own quantiles are far off, so a tracker doing nothing would fail
    assert np.abs(model_below / T - tau)[..., outer].max() > 0.4


def test_offsets_stay_within_their_bound_and_the_median_is_never_moved() -> None:
    tr = QuantileTracker([0.1, 0.5, 0.9], 1, learning_rate=0.5, max_offset=1.0, rows=1, expert_rates=(0.5,),
                         shrink_windows=0)
    preds = np.array([[[0.0, 1.0, 2.0]]])
    for _ in range(50):  # actuals far above: the upper offsets rise to the bound and stop there
        served = tr.apply(np.array([0]), preds)
        tr.update(np.array([0]), np.array([0]), preds[:, 0], served[:, 0], np.array([100.0]))
    assert tr.experts[0, 0, :, 0].tolist() == [1.0, 0.0, 1.0]
    assert tr.guard[0, 0].tolist() == [1.0, 0.0, 1.0]
    served = tr.apply(np.array([0]), preds)[0, 0]
    # offsets 2 (expert 1 + guard 1), width 2: lower 0 + 4 = 4, clamped to the median's 1; upper 2 + 4 = 6
    assert served.tolist() == [1.0, 1.0, 6.0]
    assert calibrate(preds, np.zeros_like(preds), 1).tolist() == preds.tolist()


def test_a_gap_window_updates_nothing() -> None:
    tr = QuantileTracker([0.1, 0.5, 0.9], 2, rows=2)
    pred = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    tr.update(np.array([0, 1]), np.array([0, 1]), pred, pred, np.array([np.nan, 5.0]))
    assert not tr.experts[0].any() and not tr.guard[0].any() and tr.updates[0].tolist() == [0, 0]
    assert tr.updates[1].tolist() == [0, 1]
    # horizon step 2: the guard's step 0.05 divided by 2 ** 0.5 (calibration.delay_exponent)
    assert tr.guard[1, 1].tolist() == pytest.approx([0.05 / 2**0.5 * 0.1, 0.0, 0.05 / 2**0.5 * 0.9])


def test_repeated_cells_update_in_order_like_one_call_each() -> None:
    rng = np.random.default_rng(3)
    a, b = tracker(2, 1), tracker(2, 1)
    preds = np.tile(np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), (6, 1))
    rows, steps, y = np.array([0, 1, 0, 0, 1, 0]), np.zeros(6, dtype=np.int64), rng.normal(0, 2, 6)
    a.update(rows, steps, preds, preds, y)
    for i in range(6):
        b.update(rows[i : i + 1], steps[i : i + 1], preds[i : i + 1], preds[i : i + 1], y[i : i + 1])
    np.testing.assert_allclose(a.experts, b.experts)
    np.testing.assert_allclose(a.weights, b.weights)
    np.testing.assert_allclose(a.guard, b.guard)


def split_conformal(scores: list[float], tau: float) -> float:
    """Independently: the offset c with the fewest scores at or below it such that, with one more
    exchangeable score, P(s <= c) >= tau (upper levels), or the most such that P(s <= c) <= tau (lower)."""
    s = sorted(scores)
    n = len(s)
    if tau > 0.5:
        for k in range(1, n + 1):  # P(s_new <= s_(k)) = k / (n + 1)
            if k / (n + 1) >= tau - 1e-12:
                return s[k - 1]
        return math.nan
    best = math.nan
    for k in range(1, n + 1):
        if k / (n + 1) <= tau + 1e-12:
            best = s[k - 1]
    return best


@pytest.mark.parametrize("n", [5, 9, 19, 40, 101])
def test_conformal_quantile_is_split_conformal(n: int) -> None:
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n)
    for tau in (0.01, 0.05, 0.1, 0.25, 0.75, 0.9, 0.95, 0.99):
        want = split_conformal(scores.tolist(), tau)
        got = conformal_quantile(scores, tau)
        assert (math.isnan(want) and math.isnan(got)) or got == want, (tau, got, want)


def test_holdout_offsets_equal_an_independent_split_conformal_computation() -> None:
    rng = np.random.default_rng(7)
    S, NO, Hh, q = 4, 60, 3, [0.1, 0.5, 0.9]
    preds = np.sort(rng.normal(size=(S, NO, Hh, 3)), axis=-1) * np.array([1.0, 2.0, 3.0, 4.0])[:, None, None, None]
    actuals = rng.normal(0.3, 1.5, (S, NO, Hh))
    actuals[3, :35] = np.nan  # 25 known windows: too few for its own offsets (MIN_SERIES_WINDOWS = 40)
    names = ["a", "b", "c", "d"]
    got = holdout_offsets(preds, actuals, names, q)
    assert set(got.series) == {"a", "b", "c"}
    for h in range(Hh):
        for j, tau in ((0, 0.1), (2, 0.9)):
            pooled_scores = []
            for i in range(S):
                own = []
                for o in range(NO):
                    if np.isnan(actuals[i, o, h]):
                        continue
                    p = preds[i, o, h]
                    own.append((actuals[i, o, h] - p[j]) / max(p[-1] - p[0], max(1e-6 * abs(p[1]), 1e-9)))
                pooled_scores += own
                if names[i] in got.series:
                    assert got.series[names[i]][0][h, j] == pytest.approx(split_conformal(own, tau), abs=1e-12)
                    assert got.series[names[i]][1] == NO
            assert got.pooled[h, j] == pytest.approx(split_conformal(pooled_scores, tau), abs=1e-12)
        assert got.pooled[h, 1] == 0.0
    start, evidence = got.for_series(["a", "d", "new"])
    np.testing.assert_array_equal(start[0], got.series["a"][0])
    np.testing.assert_array_equal(start[1], got.pooled)
    np.testing.assert_array_equal(start[2], got.pooled)
    assert evidence.tolist() == [NO, 0, 0]
    back = HoldoutOffsets.from_json(got.to_json())
    np.testing.assert_allclose(back.pooled, got.pooled, atol=1e-6)
    np.testing.assert_allclose(back.series["b"][0], got.series["b"][0], atol=1e-6)


def test_split_conformal_offsets_cover_on_exchangeable_data() -> None:
    """The finite-sample guarantee: over many holdout draws, the upper calibrated quantile covers at least
    tau of a new exchangeable point, the lower at most tau (the model itself is far too narrow)."""
    rng = np.random.default_rng(11)
    trials, n = 4000, 19
    preds = np.tile(np.array([-0.2, 0.0, 0.2]), (trials, n + 1, 1, 1))  # (trials, n + 1, 1, 3)
    actuals = rng.standard_t(3, (trials, n + 1, 1))
    hi_hits = lo_hits = 0
    for t in range(trials):
        off = holdout_offsets(preds[t : t + 1, :n], actuals[t : t + 1, :n], ["x"], [0.1, 0.5, 0.9])
        served = calibrate(preds[t, n:], off.pooled[None], 1)[0, 0]
        y = actuals[t, n, 0]
        hi_hits += y <= served[2]
        lo_hits += y <= served[0]
    se = math.sqrt(0.09 / trials)
    assert hi_hits / trials >= 0.9 - 3 * se
    assert lo_hits / trials <= 0.1 + 3 * se


def test_a_series_starts_from_its_own_holdout_offsets_or_the_pooled_ones_shrunk_while_young() -> None:
    q = [0.1, 0.5, 0.9]
    own = np.array([[-0.5, 0.0, 0.8]])
    prior = HoldoutOffsets(q, 1, np.array([[-0.2, 0.0, 0.3]]), 500, {"known": (own, 60)})
    tr = tracker(2, 1, prior, quantiles=q)
    tr.reset(np.arange(2), ["known", "new"])
    got = tr.served_offsets(np.arange(2))[:, 0]
    lam = 60 / (60 + N0)
    np.testing.assert_allclose(got[0], lam * own[0] + (1 - lam) * prior.pooled[0])
    np.testing.assert_allclose(got[1], prior.pooled[0])  # no evidence: all pooled
    preds = np.array([[[-1.0, 0.0, 1.0]]] * 2)
    served = tr.apply(np.arange(2), preds)
    tr.update(np.arange(2), np.zeros(2, dtype=np.int64), preds[:, 0], served[:, 0], np.array([0.0, 0.0]))
    assert tr.evidence[:2, 0].tolist() == [61.0, 1.0]
    got = tr.served_offsets(np.array([1]))[0, 0]
    cell = ReferenceCell(prior.pooled[0].tolist(), 0.0, prior.pooled[0].tolist(), q)
    cell.update([-1.0, 0.0, 1.0], served[1, 0].tolist(), 0.0)
    np.testing.assert_allclose(got, [cell.offsets()[0], 0.0, cell.offsets()[2]], atol=1e-12)


RECOVERY_WINDOWS = 75  # stated in the module docstring


def test_an_abrupt_scale_shift_is_recovered_within_the_stated_windows() -> None:
    """200 series whose model claims sd 0.5 around the right level; the truth has sd 1, then 3 from
    window 300 (the model's interval stays as it was: the worst case, the model learns nothing). Started
    from holdout offsets of the first regime, the 80% interval covers 0.8 before the shift, falls after
    it, and is back to 0.75 or more (10-window mean) within RECOVERY_WINDOWS windows; a single fixed-step
    tracker (0.05, the step before this work) takes much longer."""
    S, q = 200, [0.1, 0.5, 0.9]
    z = np.array([-1.2816, 0.0, 1.2816])
    preds = np.broadcast_to(z * 0.5, (S, 1, 3)).copy()
    names = [str(i) for i in range(S)]

    def run(tr: QuantileTracker, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        hold = rng.normal(0, 1, (S, 150, 1))
        tr.set_prior(holdout_offsets(np.broadcast_to(preds[:, None], (S, 150, 1, 3)), hold, names, q))
        tr.reset(np.arange(S), names)
        cover = []
        for t in range(600):
            y = rng.normal(0, 3.0 if t >= 300 else 1.0, S)
            served = tr.apply(np.arange(S), preds)
            cover.append(((served[:, 0, 0] <= y) & (y <= served[:, 0, 2])).mean())
            tr.update(np.arange(S), np.zeros(S, dtype=np.int64), preds[:, 0], served[:, 0], y)
        return np.array(cover)

    def recovered(cover: np.ndarray) -> int:
        after = cover[300:]
        return next(i for i in range(len(after) - 10) if after[i : i + 10].mean() >= 0.75)

    cover = run(QuantileTracker(q, 1, rows=S), 1)
    assert abs(cover[:50].mean() - 0.8) < 0.03 and abs(cover[:300].mean() - 0.8) < 0.02
    assert cover[300:310].mean() < 0.6  # the shift is felt
    fast = recovered(cover)
    assert fast <= RECOVERY_WINDOWS, fast
    fixed = QuantileTracker(q, 1, rows=S, expert_rates=(0.05,), learning_rate=1e-9, shrink_windows=0)
    slow_cover = run(fixed, 1)
    assert cover[300:400].mean() > slow_cover[300:400].mean() + 0.05


def test_holdout_coverage_reports_raw_and_out_of_sample_calibrated() -> None:
    rng = np.random.default_rng(5)
    S, NO = 20, 80
    preds = np.broadcast_to(np.array([-0.5, 0.0, 0.5]), (S, NO, 1, 3))
    actuals = rng.normal(0, 1, (S, NO, 1))
    cov = holdout_coverage(preds, actuals, [str(i) for i in range(S)], [0.1, 0.5, 0.9])
    inside = (np.abs(actuals) <= 0.5).mean()
    assert cov["raw"] == pytest.approx(inside)
    assert cov["raw"] < 0.5 and abs(cov["calibrated_second_half"] - 0.8) < 0.05
