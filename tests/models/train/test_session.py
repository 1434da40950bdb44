"""models/train/session.py: which cycle is due and the tags that say what started it (pure logic; the
whole loop runs in tests/jobs/test_train.py)."""

from __future__ import annotations

from models.scoring.drift import Drift
from models.tracking import tags
from models.train.schedule import Schedule
from models.train.session import next_trigger, trigger_tags


class FixedDrift:
    """A monitor whose drift() answers what it was given (the real LiveMonitor reads the scores topic)."""

    def __init__(self, drift: Drift | None):
        self.answer = drift

    def drift(self) -> Drift | None:
        return self.answer


def drifted() -> Drift:
    return Drift(version="3", points=480, windows=24, live_relative_mae=1.9, holdout_relative_mae=0.8,
                 factor=1.5, live_coverage=0.79, coverage_floor=0.6, by_mae=True)


def test_trigger_tags_name_the_kind_and_reason_and_carry_the_drift_figures() -> None:
    plain = trigger_tags(tags.TRIGGER_MANUAL, "rollcast train --once")
    assert plain == {tags.TRIGGER_TAG: "manual", tags.TRIGGER_REASON_TAG: "rollcast train --once"}
    d = drifted()
    with_drift = trigger_tags(tags.TRIGGER_DRIFT, d.reason(), d)
    assert with_drift[tags.TRIGGER_TAG] == "drift"
    assert with_drift[tags.TRIGGER_REASON_TAG] == d.reason()
    assert d.tags() and all(with_drift[k] == v for k, v in d.tags().items())


def test_a_due_schedule_comes_before_drift() -> None:
    windows = [100]
    schedule = Schedule(every_s=None, after_windows=10, count=lambda: windows[0])
    monitor = FixedDrift(drifted())
    windows[0] = 115  # 15 new windows: the windows schedule is due
    found = next_trigger(schedule, monitor)
    assert found is not None and found[tags.TRIGGER_TAG] == tags.TRIGGER_WINDOWS
    assert "15 new windows" in found[tags.TRIGGER_REASON_TAG]


def test_drift_starts_a_cycle_when_no_schedule_is_due() -> None:
    schedule = Schedule(every_s=3600.0, after_windows=None, count=lambda: 0)
    d = drifted()
    found = next_trigger(schedule, FixedDrift(d))
    assert found == trigger_tags(tags.TRIGGER_DRIFT, d.reason(), d)


def test_nothing_is_due_without_a_schedule_or_drift() -> None:
    schedule = Schedule(every_s=3600.0, after_windows=10, count=lambda: 5)
    assert next_trigger(schedule, FixedDrift(None)) is None
    assert next_trigger(schedule, None) is None
