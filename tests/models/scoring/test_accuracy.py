"""Live accuracy (models.scoring.accuracy): the one rule (per version, last N windows, a repeat counts once)
as LiveAccuracy and ``rollcast scores`` (models.scoring.report.Scores) both apply it, to scores of either
format (pipeline.scores_io). The per-step errors and their sums are tested with the scorer that computes
them (tests/models/scoring/test_scorer.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.scoring.accuracy import LastWindows, LiveAccuracy, LiveTotals
from models.scoring.report import Scores
from pipeline.scores_io import encode_scores

Q = [0.1, 0.5, 0.9]


def score(series: str, end: int, version: str = "1", abs_error: float = 1.0, step: int = 10, fmt: int = 1) -> dict:
    """A one-step score message as parsed from JSON, in the format before format 2 (exact errors) or in 2."""
    head = {"series": series, "last_window_end": end, "model": {"name": "tcn", "version": version},
            "issued_at": 0, "step_ms": step, "calibrated": True, "quantiles": Q}
    if fmt == 2:
        return {"format": 2, **head, "actual": [1.0], "served": [[-9.0, 1.0 + abs_error, 9.0]], "naive": [3.0],
                "model_inside": [False]}
    return {**head, "points": [{"h": 1, "ts": end, "actual": 1.0, "forecast": 1.0 + abs_error, "abs_error": abs_error,
                                "sq_error": abs_error ** 2, "pinball": None, "inside": True, "model_inside": False,
                                "naive": 1.0, "naive_abs_error": 2.0}]}


def test_a_repeat_counts_once_per_version_window_and_series() -> None:
    w: LastWindows[list[str]] = LastWindows(list)
    assert w.bin("1", 10, 10, "a") is not None
    assert w.bin("1", 10, 10, "a") is None  # the repeat
    assert w.bin("1", 10, 10, "b") is not None and w.bin("1", 20, 10, "a") is not None
    assert w.bin("2", 10, 10, "a") is not None  # another version
    assert w.bin("1", 10, 10) is w.bin("1", 10, 10)  # without a series: never a repeat, the same bin
    live = LiveAccuracy(windows=5)
    for msg in (score("a", 10, abs_error=1.0), score("a", 10, abs_error=9.0), score("b", 10, abs_error=2.0)):
        live.add_message(msg)
    assert live.totals("1").points == 2 and live.totals("1").abs_error == 3.0  # the first of a repeat is kept


def test_the_last_n_windows_are_the_newest_and_the_n_minus_1_steps_before_it() -> None:
    live = LiveAccuracy(windows=100)
    for end in (10, 20, 30, 60, 70):  # windows 40 and 50 had no scores: the last 3 windows are 50, 60, 70
        live.add_message(score("a", end, abs_error=end / 10))
    live.add_message(score("a", 40, version="2", abs_error=100.0))  # another version: its own newest
    assert live.totals("1", 3).abs_error == 6 + 7
    assert live.totals("1", 5).abs_error == 3 + 6 + 7
    assert live.totals("1").abs_error == 1 + 2 + 3 + 6 + 7
    assert live.totals("2", 1).abs_error == 100.0 and live.newest("1") == 70 and live.newest("2") == 40
    live.add_message(score("a", 35, abs_error=0.5))  # a late one, older than the newest, counts in its own window
    assert live.totals("1", 4).abs_error == 6 + 7 and live.totals("1", 5).abs_error == 3 + 0.5 + 6 + 7
    assert live.totals("1", 6).abs_error == 2 + 3 + 0.5 + 6 + 7


def test_a_bounded_live_accuracy_drops_older_windows_and_forgets_their_repeats() -> None:
    live = LiveAccuracy(windows=2)
    for end in (10, 20, 30):
        live.add_message(score("a", end, abs_error=end / 10))
    assert live.totals("1").abs_error == 2 + 3 and live.totals("1", 10).abs_error == 2 + 3
    assert [e for e, _ in live._sums.last("1")] == [20, 30]  # 10 is gone, not only hidden
    live.add_message(score("a", 30, abs_error=50.0))  # a repeat of a kept window: ignored
    assert live.totals("1").abs_error == 2 + 3


@pytest.mark.parametrize("last", [None, 1, 2, 3, 7])
def test_rollcast_scores_selects_what_live_accuracy_sums(last: int | None) -> None:
    rng = np.random.default_rng(last or 0)
    messages = [score(f"s{rng.integers(4)}", int(10 * rng.integers(12)), version=str(rng.integers(1, 3)),
                      abs_error=float(rng.uniform()), fmt=int(rng.integers(1, 3))) for _ in range(80)]
    scores, live = Scores(), LiveAccuracy(windows=1000)
    for _, value in encode_scores(messages):
        assert scores.add_value(value)
        live.add_message(json.loads(value))
    chosen = scores.selected(last)
    for version in ("1", "2"):
        got = LiveTotals()
        for s in chosen:
            if s.version == version:
                got.add(s.totals)
        want = live.totals(version, last)
        assert (got.points, got.inside) == (want.points, want.inside)
        assert got.abs_error == pytest.approx(want.abs_error)
    keys = [(s.series, s.version, s.last_window_end) for s in chosen]
    assert len(keys) == len(set(keys))
    assert scores.add_value(b"not a score") is False
