"""When the next training cycle is due: the schedules, and the drift trigger's pure decision (no Kafka)."""

from __future__ import annotations

import pytest

from models.scoring.accuracy import LiveTotals
from models.scoring.drift import drift_trigger, judge, live_metrics
from models.train.schedule import Schedule
from pipeline.errors import StoreUnavailable


def test_schedule_goes_on_from_an_earlier_cycle() -> None:
    stored = [1000]
    schedule = Schedule(3600.0, 24, lambda: stored[0])
    schedule.resume(ago_s=3000.0, new_windows=20)  # 50 minutes and 20 windows after the last cycle
    assert schedule.due() is None
    assert schedule.next() == "in 10.0 minutes or after 4 more windows"
    stored[0] += 4
    assert schedule.due() == "24 new windows"
    schedule = Schedule(3600.0, 24, lambda: stored[0])
    schedule.resume(ago_s=3601.0, new_windows=None)  # windows since then unknown: counted from now
    assert schedule.due() == "60 minutes passed"
    assert schedule.next() == "in 0.0 minutes or after 24 more windows"


def test_schedule_waits_out_a_store_that_does_not_answer() -> None:
    stored: list[int | None] = [None]

    def count() -> int:
        if stored[0] is None:
            raise StoreUnavailable("history store s3://b/h: counting windows failed: connection refused")
        return stored[0]

    schedule = Schedule(None, 24, count)  # the store is down at start
    assert schedule.due() is None and schedule.next() == "after 24 new windows"
    stored[0] = 500  # back: counting starts from its first answer
    assert schedule.due() is None and schedule.next() == "after 24 more windows"
    stored[0] = 524
    assert schedule.due() == "24 new windows"
    schedule.mark()
    stored[0] = None  # down again: nothing is due for windows
    assert schedule.due() is None
    stored[0] = 530
    assert schedule.next() == "after 18 more windows"


def test_the_schedule_says_which_of_its_triggers_fired() -> None:
    stored = [1000]
    schedule = Schedule(3600.0, 24, lambda: stored[0])
    assert schedule.trigger() is None
    stored[0] += 24
    assert schedule.trigger() == ("windows", "24 new windows")
    schedule.resume(ago_s=3600.0, new_windows=None)
    assert schedule.trigger() == ("schedule", "60 minutes passed")  # the clock first when both are due


# --------------------------------------------------------------------------- the drift trigger (models.scoring.drift)

def totals(points: int, abs_error: float, naive_abs_error: float, inside: int) -> LiveTotals:
    return LiveTotals(points=points, abs_error=abs_error, sq_error=abs_error, naive_abs_error=naive_abs_error,
                      inside=inside, model_inside=inside)


JUDGE = {"factor": 1.5, "coverage_floor": 0.65, "min_points": 200, "windows": 48}


def test_drift_is_live_relative_mae_over_holdout_times_factor_or_coverage_under_the_floor() -> None:
    # holdout relative MAE 0.6: drift above 0.9 live
    calm = judge("3", totals(200, 80.0, 100.0, 180), 0.6, **JUDGE)
    assert calm is not None and not calm.drifted and calm.live_relative_mae == pytest.approx(0.8)
    worse = judge("3", totals(200, 95.0, 100.0, 180), 0.6, **JUDGE)
    assert worse.by_mae and not worse.by_coverage and worse.drifted
    assert "live relative MAE 0.95 > holdout 0.6 x 1.5" in worse.reason()
    tags = worse.tags()
    assert tags["rollcast.drift.live_relative_mae"] == "0.95" and tags["rollcast.drift.holdout_relative_mae"] == "0.6"
    assert tags["rollcast.drift.factor"] == "1.5" and tags["rollcast.drift.points"] == "200"
    assert tags["rollcast.drift.live_coverage"] == "0.9" and tags["rollcast.drift.coverage_floor"] == "0.65"
    assert tags["rollcast.drift.by"] == "relative_mae" and tags["rollcast.drift.version"] == "3"
    uncovered = judge("3", totals(200, 80.0, 100.0, 129), 0.6, **JUDGE)  # coverage 0.645
    assert uncovered.by_coverage and not uncovered.by_mae and uncovered.tags()["rollcast.drift.by"] == "coverage"


def test_no_judgement_on_too_few_points_and_a_test_is_off_without_its_figures() -> None:
    assert judge("3", totals(199, 500.0, 100.0, 0), 0.6, **JUDGE) is None  # 199 < drift_min_points
    # no holdout relative MAE (or no seasonal-naive error live): only the coverage test can fire
    assert not judge("3", totals(200, 500.0, 100.0, 200), None, **JUDGE).drifted
    assert not judge("3", totals(200, 500.0, 0.0, 200), 0.6, **JUDGE).drifted
    assert not judge("3", totals(200, 500.0, 100.0, 0), 0.6, **{**JUDGE, "factor": None, "coverage_floor": None}).drifted


def test_a_drift_starts_a_cycle_only_after_the_cooldown() -> None:
    drifted = judge("3", totals(200, 95.0, 100.0, 180), 0.6, **JUDGE)
    assert drift_trigger(drifted, since_last_cycle_s=29 * 60, cooldown_minutes=30) is None
    assert drift_trigger(drifted, since_last_cycle_s=30 * 60, cooldown_minutes=30) is drifted
    assert drift_trigger(judge("3", totals(200, 80.0, 100.0, 180), 0.6, **JUDGE), 1e9, 30) is None
    assert drift_trigger(None, 1e9, 30) is None
    assert drift_trigger(drifted, 0.0, 0) is drifted  # no cooldown


def test_live_metrics_leave_out_what_is_not_known() -> None:
    assert live_metrics(LiveTotals()) == {"live_points": 0.0}
    m = live_metrics(totals(4, 2.0, 4.0, 3))
    assert m == {"live_mae": 0.5, "live_relative_mae": 0.5, "live_coverage": 0.75, "live_model_coverage": 0.75,
                 "live_points": 4.0}
