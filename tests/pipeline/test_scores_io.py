"""Score messages: format 2 as written and read back (the derived errors the scorer's, to the bit), format 1
still read, the same sums of the same forecast in either, smaller than the forecast it scores; any byte
string decodes to a well-typed score or None; the live sums over a sliding window of windows per model
version."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.scoring.accuracy import LiveAccuracy, LiveTotals, totals_of
from models.scoring.scorer import PointErrors, point_errors
from pipeline.forecasts_io import forecast_message_chunks
from pipeline.scores_io import COLUMNS, decode_score, encode_scores, score_messages

H, Q, STEP = 24, [0.1, 0.5, 0.9], 3_600_000


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
                                                   "model_inside", "naive_abs_error", "format", "quantiles",
                                                   "served", "naive", "pinball"]), c, max_size=6),
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


# ---------------------------------------------------------------- format 2, and format 1 beside it


def forecasts(n: int = 40, seed: int = 0, gaps: float = 0.1):
    """``n`` scored forecasts as the scorer holds them (float32): actuals with gaps, served and model
    quantiles, seasonal naive with a few unknown steps and a served quantile that is not finite."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.01, 5000, (n, 1))
    median = level * (1 + rng.normal(0, 0.05, (n, H)))
    width = np.abs(rng.normal(0.1, 0.03, (n, H))) * level
    model_q = np.stack([median - width, median, median + width], -1).astype(np.float32)
    served = (model_q + (rng.normal(0, 0.3, (n, H)) * width)[..., None] * np.array([-1, 0, 1])).astype(np.float32)
    served[0, 5, 2] = np.nan  # a calibrated quantile gone wrong: null, that step's pinball of it too
    actual = (median + rng.normal(0, 0.1, (n, H)) * level).astype(np.float32)
    actual[rng.random((n, H)) < gaps] = np.nan
    naive = (median + rng.normal(0, 0.1, (n, H)) * level).astype(np.float32)
    naive[1, -3:] = np.nan  # seasonal naive unknown
    return actual, served, model_q, naive


@dataclass
class Batch:
    actual: np.ndarray
    served: np.ndarray
    naive: np.ndarray
    errors: PointErrors
    origins: np.ndarray


def batch(**kw) -> Batch:
    actual, served, model_q, naive = forecasts(**kw)
    return Batch(actual, served, naive, point_errors(actual, served, model_q, naive, Q),
                 1_399_334_400_000 + np.arange(len(actual), dtype=np.int64) * STEP)


def format_2(b: Batch) -> list[tuple[str, bytes]]:
    n = len(b.actual)
    return score_messages([f"s{i}" for i in range(n)], b.origins, [("tcn", "3")], np.zeros(n, dtype=np.int64),
                          np.full(n, 1_795_432_000_000), STEP, True, Q, actual=b.actual, served=b.served,
                          naive=b.naive, model_inside=b.errors.model_inside)


def format_1(b: Batch) -> list[tuple[str, bytes]]:
    """The same forecasts as the forecast job wrote them before format 2 (README's former format: one
    object per step, the errors written out in float64)."""
    def num(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    e, out = b.errors, []
    for i in range(len(b.actual)):
        points = []
        for h in range(H):
            known = bool(e.known[i, h])
            points.append({
                "h": h + 1, "ts": int(b.origins[i]) + h * STEP, "actual": num(e.actual[i, h]) if known else None,
                "forecast": num(e.forecast[i, h]),
                **{k: (num(getattr(e, k)[i, h]) if known else None) for k in ("abs_error", "sq_error")},
                "pinball": {f"{q:g}": num(e.pinball[i, h, j]) for j, q in enumerate(Q)} if known else None,
                "inside": bool(e.inside[i, h]) if known else None,
                "model_inside": bool(e.model_inside[i, h]) if known else None,
                "naive": num(e.naive[i, h]), "naive_abs_error": num(e.naive_abs_error[i, h]) if known else None})
        out.append({"series": f"s{i}", "last_window_end": int(b.origins[i]), "model": {"name": "tcn", "version": "3"},
                    "issued_at": 1_795_432_000_000, "step_ms": STEP, "calibrated": True, "quantiles": Q,
                    "points": points})
    return encode_scores(out)


def column(values: np.ndarray, known: np.ndarray | None = None) -> list:
    """An (H,) or (H, Q) array as a decoded column: NaN and unknown steps None."""
    rows = values.tolist()
    nulls = [[None if x != x else x for x in r] if isinstance(r, list) else (None if r != r else r) for r in rows]
    return nulls if known is None else [r if k else None for r, k in zip(nulls, known.tolist(), strict=True)]


def test_format_2_reads_back_the_scorers_values_and_errors_to_the_bit() -> None:
    b = batch()
    e = b.errors
    for i, (series, value) in enumerate(format_2(b)):
        msg = decode_score(value)
        assert msg is not None and msg["format"] == 2 and msg["series"] == series == f"s{i}"
        assert json.loads(value)["format"] == 2 and "points" not in json.loads(value)
        assert msg["last_window_end"] == b.origins[i] and msg["quantiles"] == Q and msg["step_ms"] == STEP
        known = e.known[i]
        assert msg["actual"] == column(e.actual[i]) and msg["served"] == column(b.served[i].astype(np.float64))
        assert msg["naive"] == column(e.naive[i]) and msg["forecast"] == column(e.forecast[i])
        for name in ("abs_error", "sq_error", "pinball", "inside", "model_inside", "naive_abs_error"):
            assert msg[name] == column(getattr(e, name)[i], known), name
        assert set(COLUMNS) <= set(msg)
    assert not e.known.all() and not np.isfinite(b.served).all()  # gaps and a null quantile were there


def test_format_1_still_reads_and_gives_the_same_scores_and_sums() -> None:
    b = batch(seed=1)
    totals = b.errors.totals()
    for (_, old), (_, new), want in zip(format_1(b), format_2(b), totals, strict=True):
        one, two = decode_score(old), decode_score(new)
        assert one is not None and two is not None and one["format"] == 1 and one["served"] is None
        assert {k: v for k, v in one.items() if k not in ("format", "served")} == \
            {k: v for k, v in two.items() if k not in ("format", "served")}
        assert totals_of(one) == totals_of(two)  # exactly: a user upgrading sees no step in the figures
        assert totals_of(two).points == want.points and totals_of(two).abs_error == pytest.approx(want.abs_error)
        assert totals_of(json.loads(new)) == totals_of(two)  # a message parsed by json alone is decoded first


def test_a_score_message_is_smaller_than_the_forecast_it_scores() -> None:
    b = batch(gaps=0.0)

    class Model:
        name, version, quantiles = "tcn", "3", Q

    [fc] = forecast_message_chunks([f"s{i}" for i in range(len(b.actual))], b.origins, b.served, Model, STEP,
                                   1_795_432_000_000, model_preds=b.served)
    for (_, forecast), (_, score), (_, old) in zip(fc, format_2(b), format_1(b), strict=True):
        assert len(score) < 0.5 * len(forecast) and len(score) < 0.3 * len(old)


def valid_2() -> dict:
    return json.loads(format_2(batch(n=2))[1][1])


@pytest.mark.parametrize("change", [
    {"format": 3}, {"format": "2"}, {"format": True}, {"quantiles": [0.1, 0.9]}, {"actual": []},
    {"actual": "x"}, {"naive": [1.0]}, {"model_inside": [True] * (H - 1)}, {"served": [[1.0, 2.0]] * H},
    {"served": [[1.0, 2.0, 3.0]] * (H - 1) + [5.0]}, {"served": [[1.0, "2", 3.0]] * H},
    {"served": [[1.0, [2.0], 3.0]] * H}, {"actual": [True] * H}, {"actual": [1e39] * H},
    {"actual": [10 ** 400] * H}, {"model_inside": [None] * H}, {"model_inside": [1] * H},
    {"served": [[1.0, None, 3.0]] * H},  # a scored step without its point forecast
])
def test_what_is_not_a_format_2_score_decodes_to_none(change: dict) -> None:
    scored = {**valid_2(), "actual": [1.0] * H, "model_inside": [True] * H}  # every step scored
    assert decode_score(json.dumps(scored).encode()) is not None
    assert decode_score(json.dumps({**scored, **change}).encode()) is None


@pytest.mark.parametrize("value", [b"1" * 5000, b'{"series": "a", "last_window_end": 1' + b"0" * 5000 + b"}",
                                   b'{"format": 2, "actual": [NaN]}', b"[" * 100_000])
def test_what_json_itself_refuses_or_chokes_on_decodes_to_none(value: bytes) -> None:
    assert decode_score(value) is None


def mutated(msg: dict, path: list[int], value: object) -> bytes:
    """``msg`` with one entry replaced by ``value``: the one ``path`` leads to (each step picks a key or an
    index, modulo their number), stopping at the first that is not a non-empty object or array."""
    out = json.loads(json.dumps(msg))
    node = out
    for i, step in enumerate(path):
        keys = sorted(node) if isinstance(node, dict) else range(len(node))
        key = keys[step % len(keys)]
        child = node[key]
        if i == len(path) - 1 or not isinstance(child, dict | list) or not child:
            node[key] = value
            break
        node = child
    return json.dumps(out).encode()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                    max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=4), JSON)
def test_a_format_2_score_changed_anywhere_decodes_to_a_well_typed_score_or_none(path: list, value: object) -> None:
    msg = decode_score(mutated(valid_2(), path, value))
    if msg is None:
        return
    h = len(msg["actual"])
    for name in COLUMNS:
        assert len(msg[name]) == h, name
    assert all(x is None or isinstance(x, float) and math.isfinite(x) for x in msg["actual"] + msg["naive"])
    assert all(isinstance(x, bool) for a, x in zip(msg["actual"], msg["inside"], strict=True) if a is not None)
    assert all(isinstance(x, bool) for a, x in zip(msg["actual"], msg["model_inside"], strict=True) if a is not None)
    t = totals_of(msg)
    assert t.points == sum(a is not None for a in msg["actual"]) and math.isfinite(t.abs_error)
