"""Anomaly flags (models.scoring.anomaly, the scorer's settlement, pipeline.anomalies_io), pure logic: the tail
probability against its definition, the flags of the live scorer against an offline computation over the
forecasts it served, and their rate on data without anomalies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.scoring.anomaly import cdf, outside, tail_probability
from models.scoring.scorer import ModelRef, Scorer
from pipeline.anomalies_io import decode_anomaly
from pipeline.config import load_settings

Q = [0.01, 0.1, 0.5, 0.9, 0.99]
STEP, H = 10, 2


def test_the_cdf_passes_through_every_served_quantile_and_is_monotone() -> None:
    served = np.array([[1.0, 2.0, 3.0, 4.0, 6.0]])
    at = cdf(np.repeat(served, 5, axis=0), Q, served[0])
    np.testing.assert_allclose(at, Q)
    ys = np.linspace(-5, 15, 401)
    f = cdf(np.repeat(served, len(ys), axis=0), Q, ys)
    assert (np.diff(f) >= -1e-15).all() and f[0] > 0 and f[-1] < 1
    assert cdf(served, Q, np.array([2.5]))[0] == pytest.approx(0.1 + 0.5 * 0.4)  # linear between knots
    # exponential tails through the two outermost knots of each side
    b_lo = (2.0 - 1.0) / math.log(0.1 / 0.01)
    assert cdf(served, Q, np.array([0.0]))[0] == pytest.approx(0.01 * math.exp(-1.0 / b_lo))
    b_hi = (6.0 - 4.0) / math.log(0.1 / 0.01)
    assert cdf(served, Q, np.array([9.0]))[0] == pytest.approx(1 - 0.01 * math.exp(-3.0 / b_hi))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=5, max_size=5), st.floats(-1e7, 1e7))
def test_outside_the_level_interval_exactly_when_the_tail_probability_is_below_one_minus_level(
        raw: list[float], y: float) -> None:
    served = np.sort(np.array([raw]))
    p = tail_probability(served, Q, np.array([y]))[0]
    out = outside(served, (0, 4), np.array([y]))[0]
    assert 0.0 <= p <= 1.0
    if out:
        assert p < 0.02 + 1e-12
    else:
        assert p >= 0.02 - 1e-12


def _scorer(**env: str) -> Scorer:
    s = load_settings(env={f"ROLLCAST_{k}": v for k, v in env.items()})
    return Scorer(s, ModelRef("tcn", "1", Q), H, STEP)


def _feed(scorer: Scorer, values: np.ndarray, preds: np.ndarray, batch: int = 1):
    """Windows of one series ``values[t]`` (end 1000 + t * STEP), each with a forecast ``preds[t]`` (H, Q);
    the anomaly messages decoded, and every forecast served."""
    found, served = [], {}
    for lo in range(0, len(values), batch):
        t = np.arange(lo, min(len(values), lo + batch))
        out = scorer.run(["a"] * len(t), 1000 + t * STEP, values[t], np.zeros(len(t), np.int32), np.arange(len(t)),
                         preds[t].astype(np.float32), np.zeros((len(t), H)), issued_at=int(lo))
        for g in out.issued:
            for j, row in zip(g.index.tolist(), g.served, strict=True):
                served[int(1000 + t[j] * STEP)] = row
        found += [decode_anomaly(v) for _, v in out.emitted.anomaly_messages()]
    return found, served


def test_the_scorer_flags_actuals_outside_the_served_interval_of_the_forecast_one_step_before() -> None:
    rng = np.random.default_rng(0)
    n = 60
    values = rng.normal(0, 1, n)
    values[[20, 41]] = [9.0, -7.5]
    values[30] = np.nan  # a gap window: never flagged
    z = np.array([-2.326, -1.2816, 0.0, 1.2816, 2.326])
    preds = np.broadcast_to(z, (n, H, 5)).copy()
    found, served = _feed(_scorer(CALIBRATION__ENABLED="false"), values, preds)
    # offline: window t settles step 1 of the forecast issued at the end of window t - 1
    want = []
    for t in range(1, n):
        q = served[1000 + (t - 1) * STEP][0]
        if values[t] < q[0] or values[t] > q[4]:
            want.append((1000 + (t - 1) * STEP, float(np.float32(values[t]))))
    assert [(m["ts"], m["actual"]) for m in found] == [(k, pytest.approx(v)) for k, v in want]
    assert {1000 + 19 * STEP, 1000 + 40 * STEP} <= {m["ts"] for m in found}
    spike = next(m for m in found if m["ts"] == 1000 + 19 * STEP)
    assert spike["side"] == "above" and spike["upper"] == pytest.approx(2.326, rel=1e-6)
    assert spike["lower"] == pytest.approx(-2.326, rel=1e-6) and spike["level"] == 0.98
    assert spike["model"] == {"name": "tcn", "version": "1"} and spike["tail_probability"] < 0.02
    assert next(m for m in found if m["ts"] == 1000 + 40 * STEP)["side"] == "below"
    # batching does not change what is flagged
    again, _ = _feed(_scorer(CALIBRATION__ENABLED="false"), values, preds, batch=7)

    def same(m: dict) -> dict:
        return {k: v for k, v in m.items() if k != "issued_at"}  # the test's issued_at is per batch

    assert [same(m) for m in again] == [same(m) for m in found]


def test_repeats_flag_nothing_again_and_disabled_or_missing_quantiles_flag_nothing() -> None:
    values = np.array([0.0, 50.0, 0.0, 0.0])
    preds = np.broadcast_to(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), (4, H, 5)).copy()
    scorer = _scorer(CALIBRATION__ENABLED="false")
    found, _ = _feed(scorer, values, preds)
    assert len(found) == 1
    again, _ = _feed(scorer, values, preds)  # every window again (a restart before a save): repeats
    assert again == []
    off, _ = _feed(_scorer(CALIBRATION__ENABLED="false", ANOMALIES__ENABLED="false"), values, preds)
    assert off == []


def test_on_data_without_anomalies_the_flag_rate_is_close_to_one_minus_level() -> None:
    """A model whose quantiles are right up to a scale 0.7 times too small: calibration widens every
    level, and the share flagged settles near 0.02 (the model's own quantiles would flag ~15%)."""
    rng = np.random.default_rng(1)
    n, S = 1500, 40
    z = np.array([-2.326, -1.2816, 0.0, 1.2816, 2.326])
    s = load_settings(env={})
    scorer = Scorer(s, ModelRef("tcn", "1", Q), H, STEP)
    flagged = settled = 0
    for t in range(n):
        y = rng.normal(0, 1, S)
        out = scorer.run([f"s{k}" for k in range(S)], np.full(S, 1000 + t * STEP), y, np.zeros(S, np.int32),
                         np.arange(S), np.broadcast_to(0.7 * z, (S, H, 5)).astype(np.float32), np.zeros((S, H)),
                         issued_at=t)
        if t >= 500:  # after the offsets settled (no holdout start here)
            flagged += out.emitted.anomaly_count
            settled += S
    rate = flagged / settled
    assert 0.012 < rate < 0.03, rate


@given(st.binary(max_size=300))
def test_decode_anomaly_takes_any_bytes(data: bytes) -> None:
    out = decode_anomaly(data)
    assert out is None or isinstance(out, dict)
