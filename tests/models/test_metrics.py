"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models import metrics as M

Y = [10.0, 12.0, 8.0, 0.0]
F = [11.0, 10.0, 8.0, 0.0]


def test_mae_rmse_smape_by_hand() -> None:
    assert M.mae(Y, F) == pytest.approx((1 + 2 + 0 + 0) / 4)
    assert M.rmse(Y, F) == pytest.approx(math.sqrt((1 + 4) / 4))
    # 2|e|/(|y|+|f|): 2/21, 4/22, 0, 0 (0/0 counts as 0)
    assert M.smape(Y, F) == pytest.approx(100 * (2 / 21 + 4 / 22) / 4)


def test_mase_by_hand() -> None:
    insample = [1.0, 3.0, 2.0, 6.0]
    # naive in-sample MAE: |3-1|, |2-3|, |6-2| -> 7/3
    assert M.mase(Y, F, insample, season=1) == pytest.approx(0.75 / (7 / 3))
    # season 2: |2-1|, |6-3| -> 2
    assert M.mase(Y, F, insample, season=2) == pytest.approx(0.75 / 2)


def test_coverage_and_nan_handling() -> None:
    assert M.coverage([1.0, 2.0, 3.0, 4.0], [0.0, 2.5, 3.0, 0.0], [2.0, 3.0, 3.0, 3.9]) == 0.5
    assert M.mae([1.0, np.nan], [2.0, 5.0]) == 1.0
