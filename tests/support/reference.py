"""A deliberately simple per-event reference of the windowing semantics (for tests only)."""

from __future__ import annotations

import math


def reference_windows(items: list[tuple], length: int, grace: int, max_gap: int = 100_000) -> tuple[list[dict], list[int]]:
    """Process items one by one: ``("event", series, ts, value, seq)`` or ``("idle", series)``.

    Returns (closed windows sorted by series and start, seqs of late events).
    """
    max_ts: int | None = None
    closed_until: dict[str, int] = {}
    open_: dict[str, dict[int, list[tuple[int, int, float]]]] = {}
    out: list[dict] = []
    late: list[int] = []

    def emit(series: str, starts: list[int]) -> None:
        for ws in sorted(starts):
            events = open_[series].pop(ws)
            prev = closed_until.get(series)
            if prev is not None and 0 < (ws - prev) // length <= max_gap:
                for g in range(prev, ws, length):
                    out.append(dict(series=series, window_start=g, window_end=g + length, count=0,
                                    first=None, last=None, min=None, max=None, mean=None, sum=None))
            values = [v for _, _, v in events]
            first = min(events, key=lambda e: (e[0], e[1]))[2]
            last = max(events, key=lambda e: (e[0], e[1]))[2]
            total = math.fsum(values)
            out.append(dict(series=series, window_start=ws, window_end=ws + length, count=len(values),
                            first=first, last=last, min=min(values), max=max(values),
                            mean=total / len(values), sum=total))
            closed_until[series] = ws + length

    for item in items:
        if item[0] == "idle":
            s = item[1]
            if open_.get(s):
                emit(s, list(open_[s]))
            continue
        _, s, ts, value, seq = item
        wm = -math.inf if max_ts is None else max_ts - grace
        ws = (ts // length) * length
        if ws + length <= wm or ws + length <= closed_until.get(s, -math.inf):
            late.append(seq)
        else:
            open_.setdefault(s, {}).setdefault(ws, []).append((ts, seq, value))
        max_ts = ts if max_ts is None else max(max_ts, ts)
        wm = max_ts - grace
        for series, wins in open_.items():
            due = [w for w in wins if w + length <= wm]
            if due:
                emit(series, due)
    out.sort(key=lambda r: (r["series"], r["window_start"]))
    return out, late
