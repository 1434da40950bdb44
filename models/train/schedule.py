"""When the next training cycle is due: every T minutes, after N new windows in the history store, or
whichever comes first when both are set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from models.tracking.tags import TRIGGER_SCHEDULE, TRIGGER_WINDOWS
from pipeline.errors import StoreUnavailable

log = logging.getLogger("rollcast.train")


class Schedule:
    """When the next cycle is due: every ``every_s`` seconds and/or after ``after_windows`` new windows.

    ``count`` (the windows in the store) may raise :class:`StoreUnavailable`: while the store does not
    answer, no cycle is due for new windows (one warning per outage), and counting starts again from
    the first answer."""

    def __init__(self, every_s: float | None, after_windows: int | None, count: Callable[[], int]):
        self.every_s, self.after_windows, self.count = every_s, after_windows, count
        self._store_down = False
        self.last_time = time.monotonic()
        self.last_count = self._count()

    def _count(self) -> int | None:
        if self.after_windows is None:
            return None
        try:
            n = self.count()
        except StoreUnavailable as e:
            if not self._store_down:
                log.warning("cannot count the new windows (%s); no cycle for new windows until it answers", e)
            self._store_down = True
            return None
        if self._store_down:
            log.info("the history store answers again")
            self._store_down = False
        return n

    def mark(self) -> None:
        self.last_time = time.monotonic()
        self.last_count = self._count()

    def resume(self, ago_s: float, new_windows: int | None) -> None:
        """Go on from a cycle that ended ``ago_s`` seconds ago, since which ``new_windows`` windows
        (None: not known) reached the store."""
        self.last_time = time.monotonic() - max(0.0, ago_s)
        now = self._count()
        if new_windows is not None and now is not None:
            self.last_count = now - new_windows

    def _new_windows(self) -> int | None:
        now = self._count()
        if now is None:
            return None
        if self.last_count is None:  # the store did not answer at the last cycle: count from now
            self.last_count = now
        return now - self.last_count

    def next(self) -> str:
        """When the next cycle is due, in words."""
        parts = []
        if self.every_s is not None:
            left = max(0.0, self.every_s - (time.monotonic() - self.last_time))
            parts.append(f"in {left / 60:.1f} minutes")
        if self.after_windows is not None:
            new = self._new_windows()
            parts.append(f"after {self.after_windows - new} more windows" if new is not None
                         else f"after {self.after_windows} new windows")
        return " or ".join(parts)

    def due(self) -> str | None:
        """Why a cycle is due now, or None."""
        found = self.trigger()
        return found[1] if found is not None else None

    def trigger(self) -> tuple[str, str] | None:
        """Which schedule makes a cycle due now, and why in words: ``("schedule", "60 minutes passed")``
        (train.every_minutes) or ``("windows", "24 new windows")`` (train.after_windows); None if neither."""
        if self.every_s is not None and time.monotonic() - self.last_time >= self.every_s:
            return TRIGGER_SCHEDULE, f"{self.every_s / 60:g} minutes passed"
        if self.after_windows is not None:
            new = self._new_windows()
            if new is not None and new >= self.after_windows:
                return TRIGGER_WINDOWS, f"{new} new windows"
        return None
