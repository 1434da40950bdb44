"""``poll_promptly``: records that arrive while kafka-python's poll sleeps are still returned promptly.

Poll logic only, with a scripted consumer (see tests/conftest.py); ``poll_promptly`` also runs in every
job test against the real broker."""

from __future__ import annotations

import time

from pipeline.kafka.clients import POLL_SLICE_MS, poll_promptly


class SleepingConsumer:
    """A scripted consumer, not Kafka: it plays kafka-python's poll when its fetcher is idle, which
    sleeps out the whole timeout without fetching, so records that became available meanwhile come back
    only from the next poll (a case a real broker produces only now and then)."""

    def __init__(self, ready_after_s: float | None):
        self.ready_at = None if ready_after_s is None else time.monotonic() + ready_after_s
        self.timeouts: list[int] = []

    def poll(self, timeout_ms: int) -> dict:
        self.timeouts.append(timeout_ms)
        if self.ready_at is not None and time.monotonic() >= self.ready_at:
            return {"tp": ["record"]}
        time.sleep(timeout_ms / 1000)
        return {}


def test_records_arriving_during_a_sleeping_poll_are_returned_long_before_the_timeout() -> None:
    consumer = SleepingConsumer(ready_after_s=0.03)
    t0 = time.monotonic()
    records = poll_promptly(consumer, timeout_ms=3000)
    elapsed = time.monotonic() - t0
    assert records == {"tp": ["record"]}
    # one plain poll(3000) would have slept 3 s; each slice sleeps at most POLL_SLICE_MS
    assert elapsed < 1.5
    assert consumer.timeouts and max(consumer.timeouts) <= POLL_SLICE_MS


def test_nothing_arriving_returns_empty_after_the_whole_timeout() -> None:
    consumer = SleepingConsumer(ready_after_s=None)
    t0 = time.monotonic()
    assert poll_promptly(consumer, timeout_ms=60) == {}
    # the whole timeout, in several slices of at most POLL_SLICE_MS (how many depends on how far each
    # sleep overshoots on a loaded machine, so they are not counted)
    assert time.monotonic() - t0 >= 0.06
    assert len(consumer.timeouts) > 1 and max(consumer.timeouts) <= POLL_SLICE_MS
    # a zero timeout is one non-blocking poll, as consumer.poll(timeout_ms=0)
    consumer = SleepingConsumer(ready_after_s=None)
    assert poll_promptly(consumer, timeout_ms=0) == {}
    assert consumer.timeouts == [0]
