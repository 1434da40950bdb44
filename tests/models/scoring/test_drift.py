"""The drift judgement (models.scoring.drift) as pure functions: its thresholds at their edges, the
cooldown, and the monitor judging the champion on its last ``train.drift_windows`` windows only, from scores
of either format (no broker, no MLflow: decoded scores are added to the monitor's sums directly)."""

from __future__ import annotations

import json
import math

import pytest

from models.scoring.accuracy import LiveTotals
from models.scoring.drift import LiveMonitor, cooled_down, drift_trigger, judge
from pipeline.config import load_settings
from pipeline.scores_io import decode_score

RULES = {"factor": 2.0, "coverage_floor": 0.5, "min_points": 10, "windows": 24}


def totals(points: int = 10, abs_error: float = 10.0, naive_abs_error: float = 10.0, inside: int = 10) -> LiveTotals:
    return LiveTotals(points=points, abs_error=abs_error, sq_error=0.0, naive_abs_error=naive_abs_error,
                      inside=inside, model_inside=0)


def test_the_thresholds_are_strict_and_judged_from_min_points_on() -> None:
    assert judge("1", totals(points=9), 0.5, **RULES) is None
    at_min = judge("1", totals(points=10), 0.5, **RULES)
    assert at_min is not None and at_min.points == 10 and at_min.windows == 24
    # live relative MAE 1.0 against holdout 0.5 x 2: equal is no drift; a hair above is
    assert not judge("1", totals(abs_error=10.0), 0.5, **RULES).by_mae
    assert judge("1", totals(abs_error=10.001), 0.5, **RULES).by_mae
    # coverage 0.5 against floor 0.5: equal is no drift; one point fewer inside is
    assert not judge("1", totals(inside=5), 0.5, **RULES).by_coverage
    both = judge("1", totals(abs_error=30.0, inside=4), 0.5, **RULES)
    assert both.by_mae and both.by_coverage and both.drifted and both.tags()["rollcast.drift.by"] == "relative_mae,coverage"
    assert both.reason() == ("drift of version 1: live relative MAE 3 > holdout 0.5 x 2 and live coverage 0.400 < 0.5"
                             " (10 points in the last 24 windows)")
    calm = judge("1", totals(), 0.5, **RULES)
    assert not calm.drifted and calm.reason().startswith("drift of version 1: none (10 points")


@pytest.mark.parametrize("holdout", [None, math.nan, math.inf, 0.0, -1.0])
def test_the_mae_test_needs_a_finite_positive_holdout(holdout: float | None) -> None:
    judged = judge("1", totals(abs_error=1e6), holdout, **RULES)
    assert judged is not None and not judged.by_mae


def test_a_test_without_its_threshold_or_its_live_figure_never_fires() -> None:
    assert not judge("1", totals(abs_error=1e6, inside=0), 0.5, **{**RULES, "factor": None,
                                                                    "coverage_floor": None}).drifted
    no_naive = judge("1", totals(abs_error=1e6, naive_abs_error=0.0), 0.5, **RULES)  # relative MAE unknown
    assert math.isnan(no_naive.live_relative_mae) and not no_naive.by_mae
    assert no_naive.tags()["rollcast.drift.live_relative_mae"] == "nan"
    off = judge("1", totals(inside=0), None, **{**RULES, "coverage_floor": None})
    assert off.tags()["rollcast.drift.coverage_floor"] == "" and off.tags()["rollcast.drift.holdout_relative_mae"] == ""


def test_the_cooldown_counts_from_the_last_cycle_whatever_started_it() -> None:
    drifted = judge("1", totals(inside=0), 0.5, **RULES)
    assert not cooled_down(599.9, 10) and cooled_down(600.0, 10) and cooled_down(0.0, 0)
    assert drift_trigger(drifted, 599.9, 10) is None
    assert drift_trigger(drifted, 600.0, 10) is drifted
    assert drift_trigger(judge("1", totals(), 0.5, **RULES), 1e9, 10) is None  # no drift
    assert drift_trigger(None, 1e9, 10) is None  # too few points


def score(version: str, end: int, abs_error: float, fmt: int = 2) -> dict:
    """A score read from the topic (decode_score) of five steps of ``abs_error``, naive's 1.0, all inside;
    in the format the forecast job writes, or the one before it (still on a topic after an upgrade)."""
    head = {"series": "a", "last_window_end": end, "model": {"name": "tcn", "version": version}, "issued_at": 0,
            "step_ms": 10, "calibrated": True, "quantiles": [0.1, 0.5, 0.9]}
    if fmt == 2:
        msg = {"format": 2, **head, "actual": [1.0] * 5, "served": [[-100.0, 1.0 + abs_error, 100.0]] * 5,
               "naive": [0.0] * 5, "model_inside": [True] * 5}
    else:
        points = [{"h": 1, "ts": end, "actual": 1.0, "forecast": 1.0 + abs_error, "abs_error": abs_error,
                   "sq_error": abs_error ** 2, "pinball": None, "inside": True, "model_inside": True, "naive": 0.0,
                   "naive_abs_error": 1.0}]
        msg = {**head, "points": points * 5}
    decoded = decode_score(json.dumps(msg).encode())
    assert decoded is not None
    return decoded


@pytest.mark.parametrize("fmt", [2, 1])
def test_the_monitor_judges_only_the_last_drift_windows(tmp_path, fmt: int) -> None:
    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_TRAIN__DRIFT_WINDOWS": "4",
                           "ROLLCAST_TRAIN__DRIFT_MIN_POINTS": "20", "ROLLCAST_TRAIN__DRIFT_FACTOR": "2",
                           "ROLLCAST_TRAIN__DRIFT_COOLDOWN_MINUTES": "10"})
    m = LiveMonitor(s, last_cycle=0.0)
    for end in range(0, 100, 10):  # ten bad windows...
        m.live.add_message(score("1", end, abs_error=5.0, fmt=fmt))
    m._champion = ("1", 1.0)
    assert m.judgement().by_mae and m.judgement().points == 20  # the last 4 windows, 5 points each
    for end in range(100, 140, 10):  # ...then four good ones: the bad ones fall out of the judged windows
        m.live.add_message(score("1", end, abs_error=1.0, fmt=fmt))
    judged = m.judgement()
    assert judged is not None and not judged.drifted and judged.live_relative_mae == 1.0
    m.live.add_message(score("1", 140, abs_error=20.0, fmt=fmt))
    assert m.judgement().live_relative_mae == pytest.approx((3 * 5 + 5 * 20) / 20)
    m.last_cycle = -1e9  # long ago: outside the cooldown
    assert m.drift() is not None
    m.cycle_done()  # a cycle just ended: within the cooldown
    assert m.drift() is None and m.judgement() is not None
