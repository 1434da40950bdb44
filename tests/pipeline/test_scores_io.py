"""Score messages: any byte string decodes to a well-typed score or None, and the live sums over a
sliding window of windows per model version."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.scoring.accuracy import LiveAccuracy, LiveTotals, totals_of
from pipeline.scores_io import decode_score, encode_scores


def score(series: str, end: int, version: str = "1", errors=(1.0, 2.0), inside=(True, False), naive=(2.0, 2.0)):
    pts = [{"h": h + 1, "ts": end + h * 10, "actual": 5.0, "forecast": 5.0 + e, "abs_error": e, "sq_error": e * e,
            "pinball": {"0.5": e / 2}, "inside": i, "model_inside": False, "naive": 0.0, "naive_abs_error": n}
           for h, (e, i, n) in enumerate(zip(errors, inside, naive, strict=True))]
    pts.append({"h": 3, "ts": end + 20, "actual": None, "abs_error": None})  # a gap window
    return {"series": series, "last_window_end": end, "model": {"name": "tcn", "version": version},
            "issued_at": 1, "step_ms": 10, "calibrated": True, "quantiles": [0.5], "points": pts}


def test_totals_and_ratios_of_a_message() -> None:
    [(key, value)] = encode_scores([score("a", 100)])
    msg = decode_score(value)
    assert key == "a" and msg is not None
    t = totals_of(msg)
    assert (t.points, t.mae, t.relative_mae, t.coverage, t.model_coverage) == (2, 1.5, 0.75, 0.5, 0.0)
    assert math.isnan(LiveTotals().mae) and math.isnan(LiveTotals().relative_mae)


def test_live_accuracy_keeps_the_last_w_windows_per_version() -> None:
    live = LiveAccuracy(windows=3)
    for end in range(100, 160, 10):  # six windows of version 1
        live.add_message(score("a", end, errors=(end / 10, 0.0)))
    live.add_message(score("a", 150, version="2", errors=(7.0, 7.0)))
    t1 = live.totals("1")
    assert t1.points == 6 and t1.abs_error == pytest.approx(13 + 14 + 15)  # ends 130, 140, 150
    assert live.totals("1", windows=1).abs_error == pytest.approx(15)
    assert live.totals("2").mae == 7.0 and sorted(live.versions()) == ["1", "2"]
    assert live.totals("3").points == 0


@pytest.mark.parametrize("value", [b"", b"null", b"[]", b'{"series": 1}', b"\xff\xfe",
                                   json.dumps({**score("a", 1), "points": [1]}).encode(),
                                   json.dumps({**score("a", 1), "step_ms": 0}).encode(),
                                   json.dumps({**score("a", 1), "last_window_end": True}).encode(),
                                   json.dumps(score("a", 1)).replace('"abs_error": 1.0', '"abs_error": "x"').encode()])
def test_what_is_not_a_score_decodes_to_none(value: bytes) -> None:
    assert decode_score(value) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                  st.sampled_from(["series", "last_window_end", "model", "version", "step_ms",
                                                   "points", "actual", "abs_error", "sq_error", "inside",
                                                   "model_inside", "naive_abs_error"]), c, max_size=6),
                              max_leaves=20).map(lambda x: json.dumps(x).encode())))
def test_any_bytes_decode_to_a_score_the_live_sums_can_take_or_to_none(value: bytes) -> None:
    msg = decode_score(value)
    if msg is not None:
        live = LiveAccuracy(5)
        assert live.add_message(msg) == msg["model"]["version"]
        assert live.totals(msg["model"]["version"]).points >= 0


def test_a_republished_score_is_counted_once() -> None:
    live = LiveAccuracy(windows=10)
    for msg in (score("a", 100), score("b", 100), score("a", 100)):  # a's repeat after a restart
        live.add_message(msg)
    assert live.totals("1").points == 4 and live.totals("1").abs_error == pytest.approx(6.0)
