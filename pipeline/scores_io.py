"""Scores on the ``scores`` topic: one JSON message per forecast whose windows have all closed, keyed by
series. The format only: the live accuracy computed from them is :mod:`models.scoring.accuracy`.

The format (README "Message formats")::

    {"series": "demand", "last_window_end": 1399334400000, "model": {"name": "tcn", "version": "3"},
     "issued_at": 1795432000000, "step_ms": 3600000, "calibrated": true, "quantiles": [0.1, 0.5, 0.9],
     "points": [{"h": 1, "ts": 1399334400000, "actual": 5.1, "forecast": 5.56, "abs_error": 0.46,
                 "sq_error": 0.2116, "pinball": {"0.1": 0.1, "0.5": 0.23, "0.9": 0.046},
                 "inside": true, "model_inside": true, "naive": 5.0, "naive_abs_error": 0.1}]}

``points`` has one entry per horizon step; ``ts`` is the start of the window it forecast (as in the
forecast message). ``forecast`` is the median; ``pinball`` is the pinball loss of each *served*
quantile (the calibrated ones when ``calibrated``); ``inside`` says whether the actual fell within the
served outer interval (lowest to highest quantile), ``model_inside`` within the model's own. ``naive``
is the seasonal-naive forecast of that step from the same origin. A step whose window was a gap
(``count = 0``) has ``actual`` and every error ``null``. The errors are computed by
:func:`models.scoring.scorer.point_errors`, once for these messages and the live sums.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import polars as pl


def decode_score(value: bytes | None) -> dict[str, Any] | None:
    """A score message as a dict, or None when ``value`` is not one: any byte string gives one or the
    other (the topic is rollcast's own, but a reader must not stop on what someone else wrote to it).
    A message this returns has what :func:`models.scoring.accuracy.totals_of` and
    :class:`models.scoring.accuracy.LiveAccuracy` read, well typed."""
    if value is None:
        return None
    try:
        msg = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("series"), str) \
            or not _is_int(msg.get("last_window_end")) or not isinstance(msg.get("points"), list) \
            or not isinstance(msg.get("model"), dict) or not isinstance(msg["model"].get("version"), str) \
            or not _is_int(msg.get("step_ms")) or msg["step_ms"] <= 0:
        return None
    for p in msg["points"]:
        if not isinstance(p, dict):
            return None
        if p.get("actual") is None:
            continue
        if not all(_is_number(p.get(k)) for k in ("actual", "abs_error", "sq_error")) \
                or not (p.get("naive_abs_error") is None or _is_number(p["naive_abs_error"])) \
                or not isinstance(p.get("inside"), bool) or not isinstance(p.get("model_inside"), bool):
            return None
    return msg


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def encode_scores(rows: Iterable[dict[str, Any]]) -> list[tuple[str, bytes]]:
    """``(series, JSON bytes)`` for score dicts in this module's format."""
    return [(r["series"], json.dumps(r, separators=(",", ":"), allow_nan=False).encode()) for r in rows]


def score_messages(series: list[str], origins: np.ndarray, models: list[tuple[str, str]], model_index: np.ndarray,
                   issued_at: np.ndarray, step_ms: int, calibrated: bool, quantiles: list[float], *,
                   known: np.ndarray, actual: np.ndarray, forecast: np.ndarray, abs_error: np.ndarray,
                   sq_error: np.ndarray, pinball: np.ndarray, inside: np.ndarray, model_inside: np.ndarray,
                   naive: np.ndarray, naive_abs_error: np.ndarray) -> list[tuple[str, bytes]]:
    """Score messages in this module's format, ``(series, JSON bytes)``, for ``n`` forecasts whose point
    fields are given as ``(n, H)`` arrays (``pinball`` ``(n, H, Q)``), computed by
    :func:`models.scoring.scorer.point_errors`. Where ``known`` is False (a gap window) ``actual``, the
    errors and the flags are ``null``; elsewhere a non-finite number is ``null`` too. The text is built
    column-wise by polars (one pass over all points, then one join per message), as forecasts are
    (:func:`pipeline.forecasts_io.forecast_message_chunks`): per-message dicts through ``json`` cost
    about 0.2 s per 1,000 scores of 24 steps."""
    n, horizon = actual.shape
    if n == 0:
        return []
    k = pl.lit(pl.Series(np.asarray(known, dtype=np.bool_).ravel()))

    def num(values: np.ndarray, only_known: bool = True) -> pl.Expr:
        x = pl.lit(pl.Series(np.asarray(values, dtype=np.float64).ravel()))
        ok = x.is_finite() & k if only_known else x.is_finite()
        return pl.when(ok).then(x.cast(pl.String)).otherwise(pl.lit("null"))

    def flag(values: np.ndarray) -> pl.Expr:
        x = pl.lit(pl.Series(values.ravel()))
        return pl.when(k).then(pl.when(x).then(pl.lit("true")).otherwise(pl.lit("false"))).otherwise(pl.lit("null"))

    h = np.broadcast_to(np.arange(1, horizon + 1), (n, horizon))
    ts = origins[:, None].astype(np.int64) + (h - 1) * int(step_ms)
    labels = [json.dumps(f"{x:g}") for x in quantiles]
    pin_parts: list[pl.Expr] = []
    for j, lab in enumerate(labels):
        pin_parts += [pl.lit(("{" if j == 0 else ",") + lab + ":"), num(pinball[..., j])]
    pin_parts.append(pl.lit("}"))
    pin = pl.when(k).then(pl.concat_str(pin_parts)).otherwise(pl.lit("null"))
    parts = [pl.lit('{"h":'), pl.lit(pl.Series(h.ravel())).cast(pl.String),
             pl.lit(',"ts":'), pl.lit(pl.Series(ts.ravel())).cast(pl.String),
             pl.lit(',"actual":'), num(actual), pl.lit(',"forecast":'), num(forecast, only_known=False),
             pl.lit(',"abs_error":'), num(abs_error), pl.lit(',"sq_error":'), num(sq_error),
             pl.lit(',"pinball":'), pin, pl.lit(',"inside":'), flag(inside),
             pl.lit(',"model_inside":'), flag(model_inside), pl.lit(',"naive":'), num(naive, only_known=False),
             pl.lit(',"naive_abs_error":'), num(naive_abs_error), pl.lit("}")]
    points = pl.select(pl.concat_str(parts))[:, 0].reshape((n, horizon)).arr.join(",")
    model_text = [json.dumps({"name": a, "version": b}, separators=(",", ":")) for a, b in models]
    names = [json.dumps(s) for s in series]
    tail = (f',"step_ms":{int(step_ms)},"calibrated":{"true" if calibrated else "false"},'
            f'"quantiles":{json.dumps(list(quantiles), separators=(",", ":"))},"points":[')
    heads = pl.select(pl.concat_str([
        pl.lit('{"series":'), pl.lit(pl.Series(names, dtype=pl.String)),
        pl.lit(',"last_window_end":'), pl.lit(pl.Series(origins.astype(np.int64))).cast(pl.String),
        pl.lit(',"model":'), pl.lit(pl.Series([model_text[i] for i in model_index.tolist()], dtype=pl.String)),
        pl.lit(',"issued_at":'), pl.lit(pl.Series(issued_at.astype(np.int64))).cast(pl.String),
        pl.lit(tail), pl.lit(points), pl.lit("]}"),
    ]).cast(pl.Binary))[:, 0].to_list()
    return list(zip(series, heads, strict=True))
