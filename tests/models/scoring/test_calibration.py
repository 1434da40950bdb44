"""Online calibration (models.scoring.calibration), against an independent plain-Python quantile tracker.

The module docstring states the guarantee: with offsets starting at ``c_0`` and updated by
``c <- c + eta * (tau - 1{y <= q~})``, over any T settled windows the share of actuals at or below the
served quantile ``q~`` is ``tau`` up to ``(|c_T - c_0| / eta) / T``, for each series, step and level,
whatever the data do. Checked here on a random stream with a level shift, on which the model's own
quantiles are far off.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.scoring.calibration import QuantileTracker, calibrate

QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]
MEDIAN = QUANTILES.index(0.5)
ETA, MAX_OFFSET = 0.05, 20.0
ROWS, H, T = 3, 2, 3000


def reference_served(pred: list[float], offsets: list[float]) -> list[float]:
    """The served quantiles of one (series, step), as the docstring describes them, one number at a time."""
    lo, hi, mid = pred[0], pred[-1], pred[MEDIAN]
    width = max(hi - lo, max(1e-6 * abs(mid), 1e-9))
    out = []
    for j, (q, c) in enumerate(zip(pred, offsets, strict=True)):
        if j == MEDIAN:
            out.append(mid)
        elif j < MEDIAN:
            out.append(min(q + c * width, mid))
        else:
            out.append(max(q + c * width, mid))
    return sorted(out)


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
    tracker = QuantileTracker(QUANTILES, H, ETA, MAX_OFFSET, rows=ROWS)
    ref = [[[0.0] * len(QUANTILES) for _ in range(H)] for _ in range(ROWS)]  # offsets, plain Python
    below = np.zeros((ROWS, H, len(QUANTILES)))  # actuals at or below the served quantile
    model_below = np.zeros((ROWS, H, len(QUANTILES)))
    rows = np.repeat(np.arange(ROWS), H)
    steps = np.tile(np.arange(H), ROWS)
    for preds, actual in stream():
        served = tracker.apply(np.arange(ROWS), preds)  # (ROWS, H, Q)
        for r in range(ROWS):
            for h in range(H):
                want = reference_served(preds[r, h].tolist(), ref[r][h])
                assert served[r, h].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
                y = float(actual[r, h])
                for j, tau in enumerate(QUANTILES):
                    hit = y <= want[j]
                    below[r, h, j] += hit
                    model_below[r, h, j] += y <= preds[r, h, j]
                    if j != MEDIAN:
                        ref[r][h][j] = min(max(ref[r][h][j] + ETA * (tau - hit), -MAX_OFFSET), MAX_OFFSET)
        tracker.update(rows, steps, served.reshape(ROWS * H, -1), actual.reshape(-1))

    np.testing.assert_allclose(tracker.offsets[:ROWS], np.array(ref), rtol=1e-9, atol=1e-9)
    assert (tracker.updates[:ROWS] == T).all()
    assert np.abs(tracker.offsets).max() < MAX_OFFSET  # never clipped: the bound is exact here
    share = below / T
    tau = np.array(QUANTILES)
    bound = np.abs(tracker.offsets[:ROWS] - 0.0) / ETA / T  # c_0 = 0
    outer = [j for j in range(len(QUANTILES)) if j != MEDIAN]
    gap = np.abs(share - tau)[..., outer]
    assert (gap <= bound[..., outer] + 1e-12).all(), (gap, bound)
    # the bound shrinks as 1/T (the offsets settle at about 6 widths after the shift): every served
    # quantile covers what it claims; the model's own are far off, so a tracker doing nothing would fail
    assert gap.max() < 0.1
    assert np.abs(model_below / T - tau)[..., outer].max() > 0.4


def test_offsets_stay_within_their_bound_and_the_median_is_never_moved() -> None:
    tracker = QuantileTracker([0.1, 0.5, 0.9], 1, learning_rate=0.5, max_offset=1.0, rows=1)
    preds = np.array([[[0.0, 1.0, 2.0]]])
    for _ in range(50):  # actuals far above: the upper offsets rise to the bound and stop there
        served = tracker.apply(np.array([0]), preds)
        tracker.update(np.array([0]), np.array([0]), served[:, 0], np.array([100.0]))
    assert tracker.offsets[0, 0].tolist() == [1.0, 0.0, 1.0]
    served = tracker.apply(np.array([0]), preds)[0, 0]
    # width 2: lower 0 + 2 = 2, clamped to the median's 1; upper 2 + 2 = 4
    assert served.tolist() == [1.0, 1.0, 4.0]
    assert calibrate(preds, np.zeros_like(preds), 1).tolist() == preds.tolist()


def test_a_gap_window_updates_nothing() -> None:
    tracker = QuantileTracker([0.1, 0.5, 0.9], 2, rows=2)
    tracker.update(np.array([0, 1]), np.array([0, 1]), np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]),
                   np.array([np.nan, 5.0]))
    assert not tracker.offsets[0].any() and tracker.updates[0].tolist() == [0, 0]
    assert tracker.updates[1].tolist() == [0, 1]
    assert tracker.offsets[1, 1].tolist() == pytest.approx([0.05 * 0.1, 0.0, 0.05 * 0.9])
