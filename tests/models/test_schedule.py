"""When the next training cycle is due."""

from __future__ import annotations

from models.schedule import Schedule
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
