"""Window tables to matrices and samples."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from models import create_model, predict
from models.data import SeriesMatrix, calendar_features, ffill, time_split, windows_to_matrix
from models.train.sampling import WindowSamples, gather
from pipeline.errors import DatasetError, NotEnoughData

HOUR = 3_600_000


def _table() -> pl.DataFrame:
    rows = []
    for s, n, offset in (("a", 6, 0), ("b", 4, 2)):
        for i in range(n):
            t = (i + offset) * HOUR
            gap = s == "a" and i == 3
            v = None if gap else float(10 * (s == "b") + i + offset)
            rows.append({"series": s, "window_start": t, "window_end": t + HOUR, "count": 0 if gap else 2,
                         "first": v, "last": v, "min": v, "max": v, "mean": v, "sum": v})
    return pl.DataFrame(rows)


def test_windows_to_matrix_fills_gaps_forward_and_aligns_series() -> None:
    m = windows_to_matrix(_table(), "mean")
    assert m.series == ["a", "b"] and m.step_ms == HOUR
    np.testing.assert_array_equal(m.values[0], [0, 1, 2, 2, 4, 5])  # the gap repeats the last value
    assert np.isnan(m.values[1, :2]).all()
    np.testing.assert_array_equal(m.values[1, 2:], [12, 13, 14, 15])
    np.testing.assert_array_equal(m.window_end_ms, np.arange(1, 7) * HOUR)
    assert windows_to_matrix(_table().to_arrow(), "last").values.shape == (2, 6)
    with pytest.raises(DatasetError, match="lacks column"):
        windows_to_matrix(_table().drop("mean"), "mean")


def test_calendar_features_by_hand() -> None:
    six_am_monday = 4 * 86_400_000 + 6 * HOUR  # 1970-01-05 06:00 UTC was a Monday
    f = calendar_features(np.array([six_am_monday]))[0]
    np.testing.assert_allclose(f[:2], [1.0, 0.0], atol=1e-12)  # a quarter of the day
    np.testing.assert_allclose(f[2:], [np.sin(2 * np.pi * 6 / 168), np.cos(2 * np.pi * 6 / 168)], atol=1e-12)


def test_predict_with_calendar_needs_window_ends() -> None:
    m = create_model("lstm", context=4, horizon=2, calendar=True, hidden=4, layers=1)
    out = predict(m, np.ones((3, 4)), window_end_ms=np.arange(4) * HOUR)
    assert out.shape == (3, 2, 3)
    with pytest.raises(Exception, match="calendar"):
        predict(m, np.ones((3, 4)))


def test_time_split() -> None:
    split = time_split(200, context=20, horizon=5, val_fraction=0.1, holdout=30)
    assert split.train == (20, 155) and split.val == (155, 170) and split.holdout == (170, 200)
    with pytest.raises(NotEnoughData):
        time_split(30, context=20, horizon=5, holdout=10)
    m = SeriesMatrix(["x"], np.arange(200.0)[None], np.arange(200) * HOUR, HOUR)
    val = WindowSamples(m, 20, 5, calendar=False, span=split.val, budget=100, seed=0)
    _, y = val.__getitems__(list(range(len(val))))
    assert len(val) == 11 and y.min() == 155 and y.max() == 169  # targets inside the validation span


def test_ffill_fills_gaps_forward_and_returns_a_new_array():
    gappy = np.array([[np.nan, 1.0, np.nan, np.nan, 4.0], [2.0, np.nan, 3.0, np.nan, np.nan]])
    np.testing.assert_array_equal(ffill(gappy), [[np.nan, 1.0, 1.0, 1.0, 4.0], [2.0, 2.0, 3.0, 3.0, 3.0]])
    full = np.arange(6.0).reshape(2, 3)
    out = ffill(full)  # nothing to fill: equal values, and not the caller's array
    out[0, 0] = 99.0
    assert full[0, 0] == 0.0 and out[1].tolist() == [3.0, 4.0, 5.0]


def test_one_gap_rule_for_samples_backtest_contexts_and_predict() -> None:
    """Series a has a gap at t=3 (value 2 carried in the matrix). A context that starts at the gap has
    no earlier value inside it: the gap rule takes the context's first known value (4), not the 2 the
    matrix carries from before the context, on every path."""
    from models.data import fill_gaps, known_any
    from models.train.backtest import forecast_at

    m = windows_to_matrix(_table(), "mean")
    np.testing.assert_array_equal(m.contexts(3, 5)[0], [np.nan, 4])  # the gap comes back as NaN
    assert np.isnan(m.contexts(1, 3)[1]).all()  # b has no window before t=2: no context there
    x, _ = gather(m, np.array([0, 1]), np.array([5, 5]), context=2, horizon=1, calendar=False)  # training
    np.testing.assert_array_equal(x[:, :, 0], [[4, 4], [13, 14]])  # a: [gap, 4] -> [4, 4]; b has no gap
    np.testing.assert_array_equal(fill_gaps(np.array([[np.nan, 4.0]])), [[4.0, 4.0]])
    assert known_any(np.array([[np.nan, np.nan], [np.nan, 1.0]])).tolist() == [False, True]

    model = create_model("lstm", context=2, horizon=1, hidden=4, layers=1)
    by_hand = predict(model, np.array([[4.0, 4.0]]))
    np.testing.assert_array_equal(predict(model, np.array([[np.nan, 4.0]])), by_hand)
    np.testing.assert_array_equal(forecast_at(model, m, np.array([5]))[0, 0], by_hand[0])
    assert np.isnan(predict(model, np.array([[np.nan, np.nan], [1.0, 2.0]]))[0]).all()  # not forecast
