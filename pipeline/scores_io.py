"""Scores on the ``scores`` topic: one JSON message per forecast whose windows have all closed, keyed by
series. The format only: the live accuracy computed from them is :mod:`models.scoring.accuracy`.

The format (README "Message formats"), ``"format": 2``: the header, then one array per field with one
entry per horizon step ``h = 1..H`` (``served`` has one row of the Q served quantiles per step)::

    {"format": 2, "series": "demand", "last_window_end": 1399334400000,
     "model": {"name": "tcn", "version": "3"}, "issued_at": 1795432000000, "step_ms": 3600000,
     "calibrated": true, "quantiles": [0.1, 0.5, 0.9],
     "actual": [5.1, null, ...],
     "served": [[3.81, 5.56, 6.98], [3.9, 5.61, 7.1], ...],
     "naive": [5.0, 4.8, ...],
     "model_inside": [true, null, ...]}

Step ``h`` forecast the window starting at ``last_window_end + (h-1)·step_ms`` (the forecast message's
``points[h-1].ts``). ``actual`` is that window's value, ``null`` for a gap window (``count = 0``: the
step is not scored). ``served`` are the quantiles served for it, in ``quantiles``' order (the calibrated
ones when ``calibrated``); the median is the point forecast. ``naive`` is the seasonal-naive forecast of
the step from the same origin. ``model_inside`` says whether the actual fell within the model's own
interval (q0.1 to q0.9 when both are among the quantiles, else its lowest to highest quantile:
:mod:`pipeline.quantiles`; the same as the served one when not ``calibrated``),
``null`` at a gap. A value that is not finite is ``null``. The values are float32 (the scorer's, as the
forecast message's are), each written as the shortest text that reads back as that float32: read as
float32 (``numpy.float32(x)``), it is the scorer's value to the bit; read as float64 it is within float32
precision of it.

Everything else a reader needs is derived from these, as the scorer computes it
(:func:`models.scoring.scorer.point_errors`: in float64 from the float32 values), and
:func:`decode_score` fills it in, to the bit what the scorer computed: ``forecast`` (the served median),
``abs_error`` = ``|actual - forecast|``, ``sq_error`` = ``(actual - forecast)²``, ``pinball`` (of each
served quantile, value v at level q: ``max(q·(actual - v), (q - 1)·(actual - v))``), ``inside``
(within the served interval of :mod:`pipeline.quantiles`: ``served[lo] <= actual <= served[hi]``) and ``naive_abs_error`` =
``|actual - naive|``; each ``null`` at a gap (and where a value it needs is).

Messages written before ``format`` existed (format 1, still read: a topic keeps them after an upgrade)
carried one object per step, with every field named and the errors written out::

    {"series": ..., "last_window_end": ..., "model": ..., "issued_at": ..., "step_ms": ...,
     "calibrated": true, "quantiles": [0.1, 0.5, 0.9],
     "points": [{"h": 1, "ts": 1399334400000, "actual": 5.1, "forecast": 5.56, "abs_error": 0.46,
                 "sq_error": 0.2116, "pinball": {"0.1": 0.1, "0.5": 0.23, "0.9": 0.046},
                 "inside": true, "model_inside": true, "naive": 5.0, "naive_abs_error": 0.1}]}

:func:`decode_score` reads both into one shape: the header, ``format`` (1 or 2) and the :data:`COLUMNS`,
each a list of H entries (``served`` and ``pinball``: of Q-entry rows, ``pinball`` None at a gap;
``served`` is None for format 1, which did not carry the quantiles, and its ``pinball`` rows are read
from the labelled objects). Readers (:func:`models.scoring.accuracy.totals_of`,
``rollcast scores``, the train job's drift monitor) use only that shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import numpy as np
import polars as pl

from pipeline.quantiles import interval_indices

FORMAT = 2

# the per-step columns of a decoded score, each a list with one entry per horizon step
COLUMNS = ("actual", "served", "naive", "model_inside",  # as carried by format 2
           "forecast", "abs_error", "sq_error", "pinball", "inside", "naive_abs_error")  # derived


class _Invalid(Exception):
    """Not a score message (internal to :func:`decode_score`)."""


def decode_score(value: bytes | None) -> dict[str, Any] | None:
    """A score message (either format) in the decoded shape of this module's docstring, or None when
    ``value`` is not one: any byte string gives one or the other (the topic is rollcast's own, but a
    reader must not stop on what someone else wrote to it). A score this returns is well typed:
    ``series`` a str, ``last_window_end`` an int, ``model["version"]`` a str, ``step_ms`` a positive
    int, ``quantiles`` a list of floats, and every column a list of H entries of the documented types."""
    if value is None:
        return None
    try:
        msg = json.loads(value)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, an integer of 4,300+ digits
        return None
    return as_score(msg)


def as_score(msg: object) -> dict[str, Any] | None:
    """A score message parsed from JSON (either format) in the decoded shape, or None when it is not
    one (:func:`decode_score`)."""
    if not isinstance(msg, dict):
        return None
    head = _header(msg)
    fmt = msg.get("format", 1)
    if head is None or not _is_int(fmt) or fmt not in (1, FORMAT):
        return None
    try:
        columns = _columns_2(msg, head["quantiles"]) if fmt == FORMAT else _columns_1(msg, head["quantiles"])
    except _Invalid:
        return None
    return {**head, "format": fmt, **columns}


def _header(msg: dict[str, Any]) -> dict[str, Any] | None:
    if not isinstance(msg.get("series"), str) or not _is_int(msg.get("last_window_end")) \
            or not isinstance(msg.get("model"), dict) or not isinstance(msg["model"].get("version"), str) \
            or not _is_int(msg.get("step_ms")) or msg["step_ms"] <= 0:
        return None
    qs = msg.get("quantiles")
    quantiles = [_number(q, strict=False) for q in qs] if isinstance(qs, list) else []
    return {"series": msg["series"], "last_window_end": msg["last_window_end"], "model": msg["model"],
            "issued_at": msg.get("issued_at"), "step_ms": msg["step_ms"], "calibrated": msg.get("calibrated"),
            "quantiles": [] if None in quantiles else quantiles}


def _columns_2(msg: dict[str, Any], quantiles: list[float]) -> dict[str, list[Any]]:
    """The columns of a format-2 message, the derived ones computed as the scorer does (numpy, in
    float64 from the float32 values)."""
    actual, served, naive, flags = (msg.get(k) for k in ("actual", "served", "naive", "model_inside"))
    if 0.5 not in quantiles or not isinstance(actual, list) or not actual:
        raise _Invalid
    horizon, nq = len(actual), len(quantiles)
    if not all(isinstance(x, list) and len(x) == horizon for x in (served, naive, flags)) \
            or {type(row) for row in served} != {list}:
        raise _Invalid
    a, s, nv = _float32s(actual, (horizon,)), _float32s(served, (horizon, nq)), _float32s(naive, (horizon,))
    if not {type(f) for f in flags} <= {bool, type(None)}:
        raise _Invalid
    known = np.isfinite(a)
    known_list = known.tolist()
    if any(k and f is None for k, f in zip(known_list, flags, strict=True)):
        raise _Invalid  # a scored step says where the actual fell
    median = quantiles.index(0.5)
    point = s[:, median]
    if not np.isfinite(point[known]).all():
        raise _Invalid  # a scored step has a point forecast
    d = a - point
    err = a[:, None] - s
    pinball = np.maximum(np.asarray(quantiles) * err, (np.asarray(quantiles) - 1) * err).tolist()
    lo, hi = interval_indices(quantiles)
    inside = ((s[:, lo] <= a) & (a <= s[:, hi])).tolist()
    finite = bool(np.isfinite(s).all())
    served_rows = s.tolist() if finite else [_nulls(row) for row in s.tolist()]
    return {
        "actual": _nulls(a.tolist()), "served": served_rows, "naive": _nulls(nv.tolist()),
        "model_inside": _known(flags, known_list), "forecast": [row[median] for row in served_rows],
        "abs_error": _known(np.abs(d).tolist(), known_list), "sq_error": _known((d * d).tolist(), known_list),
        "pinball": _known(pinball if finite else [_nulls(row) for row in pinball], known_list),
        "inside": _known(inside, known_list), "naive_abs_error": _known(_nulls(np.abs(a - nv).tolist()), known_list),
    }


def _nulls(values: list[float]) -> list[float | None]:
    return [None if x != x else x for x in values]  # NaN -> None


def _known(values: list[Any], known: list[bool]) -> list[Any]:
    return [x if k else None for x, k in zip(values, known, strict=True)]


def _float32s(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    """``values`` (a list of numbers or nulls, or a list of such lists) of ``shape``, read as float32 and
    given as float64, null as NaN. Anything else, or a number beyond float32's range, is not a score."""
    flat = list(chain.from_iterable(values)) if len(shape) > 1 else values
    if not {type(x) for x in flat} <= {float, int, type(None)}:  # not bool, str, list, dict
        raise _Invalid
    try:
        x = np.array(values, dtype=np.float64)  # None -> NaN
    except (OverflowError, ValueError):  # an integer beyond float64's range, rows of different lengths
        raise _Invalid from None
    if x.shape != shape:
        raise _Invalid
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    if int(np.count_nonzero(~np.isfinite(x))) != flat.count(None):  # NaN, Infinity, beyond float32's range
        raise _Invalid
    return x.astype(np.float64)


def _columns_1(msg: dict[str, Any], quantiles: list[float]) -> dict[str, list[Any] | None]:
    """The columns of a format-1 message (one object per step), as it carried them."""
    points = msg.get("points")
    if not isinstance(points, list):
        raise _Invalid
    labels = [f"{q:g}" for q in quantiles]
    out: dict[str, list[Any]] = {k: [] for k in COLUMNS}
    for p in points:
        if not isinstance(p, dict):
            raise _Invalid
        a = _number(p.get("actual"))
        out["actual"].append(a)
        out["naive"].append(_number(p.get("naive"), strict=False))
        out["forecast"].append(_number(p.get("forecast"), strict=False))
        if a is None:
            for k in ("model_inside", "abs_error", "sq_error", "pinball", "inside", "naive_abs_error"):
                out[k].append(None)
            continue
        err, sq, inside, mi = (p.get(k) for k in ("abs_error", "sq_error", "inside", "model_inside"))
        if err is None or sq is None or not isinstance(inside, bool) or not isinstance(mi, bool):
            raise _Invalid
        pin = p.get("pinball")
        out["abs_error"].append(_number(err))
        out["sq_error"].append(_number(sq))
        out["naive_abs_error"].append(_number(p.get("naive_abs_error")))
        out["inside"].append(inside)
        out["model_inside"].append(mi)
        out["pinball"].append([_number(pin.get(k), strict=False) for k in labels] if isinstance(pin, dict) else None)
    return {**out, "served": None}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: object, strict: bool = True) -> float | None:
    """``x`` as a float: None stays None; anything but a finite number is not a score (or, not
    ``strict``, None)."""
    if x is None:
        return None
    if isinstance(x, int | float) and not isinstance(x, bool):
        try:
            f = float(x)
        except OverflowError:  # an integer beyond float range
            f = math.inf
        if math.isfinite(f):
            return f
    if strict:
        raise _Invalid
    return None


def encode_scores(rows: Iterable[dict[str, Any]]) -> list[tuple[str, bytes]]:
    """``(series, JSON bytes)`` for score dicts as they are (a test's or a tool's; the forecast job's
    messages are built by :func:`score_messages`)."""
    return [(r["series"], json.dumps(r, separators=(",", ":"), allow_nan=False).encode()) for r in rows]


def score_messages(series: list[str], origins: np.ndarray, models: list[tuple[str, str]], model_index: np.ndarray,
                   issued_at: np.ndarray, step_ms: int, calibrated: bool, quantiles: list[float], *,
                   actual: np.ndarray, served: np.ndarray, naive: np.ndarray,
                   model_inside: np.ndarray) -> list[tuple[str, bytes]]:
    """Score messages in this module's format 2, ``(series, JSON bytes)``, for ``n`` forecasts: their
    ``actual`` (NaN: a gap window), ``naive`` and ``model_inside`` ``(n, H)`` and ``served`` quantiles
    ``(n, H, Q)``; ``models[model_index[i]]`` is forecast ``i``'s (name, version). The values are written
    as float32 (the scorer holds them so), each as the shortest text that reads back as that float32; a
    non-finite one is ``null``, and so is ``model_inside`` at a gap. The text is built column-wise by
    polars (one pass over all steps, then one join per message), as forecasts are
    (:func:`pipeline.forecasts_io.forecast_message_chunks`)."""
    n, horizon = actual.shape
    if n == 0:
        return []
    known = pl.Series(np.isfinite(actual).ravel())

    def number(values: np.ndarray) -> pl.Expr:
        v = np.asarray(values, dtype=np.float32)
        x = pl.lit(pl.Series(v.ravel()))
        return x.cast(pl.String) if np.isfinite(v).all() else \
            pl.when(x.is_finite()).then(x.cast(pl.String)).otherwise(pl.lit("null"))

    flag = pl.lit(pl.Series(np.asarray(model_inside, dtype=np.bool_).ravel()))
    row = [pl.lit("[")]
    for j in range(served.shape[2]):
        row += [number(served[..., j]), pl.lit("," if j < served.shape[2] - 1 else "]")]
    steps = pl.select(  # one row per (forecast, step)
        number(actual).alias("actual"), pl.concat_str(row).alias("served"), number(naive).alias("naive"),
        pl.when(pl.lit(known)).then(pl.when(flag).then(pl.lit("true")).otherwise(pl.lit("false")))
        .otherwise(pl.lit("null")).alias("model_inside"))
    arrays = [steps[k].reshape((n, horizon)).arr.join(",") for k in ("actual", "served", "naive", "model_inside")]
    model_text = [json.dumps({"name": a, "version": b}, separators=(",", ":")) for a, b in models]
    tail = (f',"step_ms":{int(step_ms)},"calibrated":{"true" if calibrated else "false"},'
            f'"quantiles":{json.dumps(list(quantiles), separators=(",", ":"))},"actual":[')
    values = pl.select(pl.concat_str([
        pl.lit(f'{{"format":{FORMAT},"series":'), pl.lit(pl.Series([json.dumps(s) for s in series], dtype=pl.String)),
        pl.lit(',"last_window_end":'), pl.lit(pl.Series(np.asarray(origins, dtype=np.int64))).cast(pl.String),
        pl.lit(',"model":'), pl.lit(pl.Series([model_text[i] for i in np.asarray(model_index).tolist()],
                                              dtype=pl.String)),
        pl.lit(',"issued_at":'), pl.lit(pl.Series(np.asarray(issued_at, dtype=np.int64))).cast(pl.String),
        pl.lit(tail), pl.lit(arrays[0]), pl.lit('],"served":['), pl.lit(arrays[1]),
        pl.lit('],"naive":['), pl.lit(arrays[2]), pl.lit('],"model_inside":['), pl.lit(arrays[3]), pl.lit("]}"),
    ]).cast(pl.Binary))[:, 0].to_list()
    return list(zip(series, values, strict=True))
