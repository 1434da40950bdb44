"""The forecast message: DESIGN.md's format, valid JSON for any series id, float32 values exact."""

from __future__ import annotations

import json

import numpy as np

from models.serving.forecaster import LoadedModel
from pipeline.forecasts_io import decode_forecast
from tests.support.forecast import STEP, L, forecast_messages


def test_message_format_follows_the_contract() -> None:
    model = LoadedModel("tcn", "3", None, L, 2, [0.1, 0.5, 0.9])
    preds = np.array([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    [(key, value)] = forecast_messages(["s1"], [10_000], preds, model, STEP, issued_at=123)
    assert key == "s1"
    assert json.loads(value) == {
        "series": "s1", "issued_at": 123, "last_window_end": 10_000,
        "model": {"name": "tcn", "version": "3"}, "step_ms": STEP, "calibrated": False,
        "points": [
            {"ts": 10_000, "mean": 2.0, "quantiles": {"0.1": 1.0, "0.5": 2.0, "0.9": 3.0}},
            {"ts": 11_000, "mean": 5.0, "quantiles": {"0.1": 4.0, "0.5": 5.0, "0.9": 6.0}},
        ],
    }


def test_a_calibrated_message_keeps_the_model_quantiles_and_says_so() -> None:
    model = LoadedModel("tcn", "3", None, L, 2, [0.1, 0.5, 0.9])
    own = np.array([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[0.0, 1.0, 2.0], [1.0, 1.5, 2.0]]], dtype=np.float32)
    served = own + np.array([-0.5, 0.0, 0.25], dtype=np.float32)
    out = forecast_messages(["s1", "s2"], [10_000, 20_000], served, model, STEP, issued_at=np.array([7, 8]),
                            model_preds=own)
    msgs = [json.loads(v) for _, v in out]
    assert [m["issued_at"] for m in msgs] == [7, 8] and all(m["calibrated"] is True for m in msgs)
    assert msgs[0]["points"][1] == {"ts": 11_000, "mean": 5.0, "quantiles": {"0.1": 3.5, "0.5": 5.0, "0.9": 6.25},
                                    "model_quantiles": {"0.1": 4.0, "0.5": 5.0, "0.9": 6.0}}
    assert msgs[1]["points"][0]["model_quantiles"] == {"0.1": 0.0, "0.5": 1.0, "0.9": 2.0}


def test_messages_are_valid_json_for_any_series_id_and_keep_float32_values_exactly() -> None:
    model = LoadedModel("tcn", "7", None, L, 4, [0.1, 0.5, 0.9])
    rng = np.random.default_rng(0)
    preds = np.sort(rng.normal(0, 1e4, (4, 4, 3)).astype(np.float32), axis=-1)
    preds[3, 2, 1] = np.nan  # a model that emitted NaN: null, still valid JSON
    series = ['plain', 'quo"te\\back', "tab\tnew\nline", "ünïcödé €"]
    out = forecast_messages(series, [1000, 2000, 3000, 4000], preds, model, STEP, issued_at=5)
    assert [k for k, _ in out] == series
    for i, (key, value) in enumerate(out):
        msg = json.loads(value)
        assert msg["series"] == key and msg["last_window_end"] == 1000 * (i + 1) and msg["issued_at"] == 5
        assert [p["ts"] for p in msg["points"]] == [1000 * (i + 1) + h * STEP for h in range(4)]
        for h, p in enumerate(msg["points"]):
            for j, q in enumerate(("0.1", "0.5", "0.9")):
                want = preds[i, h, j]
                got = p["quantiles"][q]
                assert (got is None) if np.isnan(want) else np.float32(got) == want  # shortest repr round-trips
            assert p["mean"] == p["quantiles"]["0.5"]


def test_decode_forecast_returns_a_message_or_none() -> None:
    model = LoadedModel("tcn", "3", None, L, 2, [0.1, 0.5, 0.9])
    ((_, raw),) = forecast_messages(["s"], [STEP], np.ones((1, 2, 3), np.float32), model, STEP, issued_at=5)
    assert decode_forecast(raw) == json.loads(raw)
    for bad in (None, b"", b"not json", b"[1]", b'{"series": 1}', b'{"series": "s"}', b"\xff", b"[" * 10_000):
        assert decode_forecast(bad) is None
