"""Anomalies on the ``anomalies`` topic: one JSON message per settled actual outside the served central
interval of ``anomalies.level`` (:mod:`models.scoring.anomaly`), keyed by series. The format only.

The format (README "Message formats")::

    {"format": 1, "series": "demand", "ts": 1399334400000, "step_ms": 3600000,
     "actual": 9.81, "forecast": 5.56, "lower": 3.02, "upper": 8.11, "level": 0.98,
     "side": "above", "tail_probability": 0.0031,
     "model": {"name": "tcn", "version": "3"}, "last_window_end": 1399334400000, "issued_at": 1795432000000}

``ts`` is the start of the window whose actual (the ``window.target`` aggregate) is flagged; the
forecast judged is the one issued when the window before it closed (``last_window_end``, equal to ``ts``:
its step ``h = 1``), by ``model``, at ``issued_at``. ``lower`` and ``upper`` are its served quantiles
``(1 - level) / 2`` and ``(1 + level) / 2``, ``forecast`` its served median; ``side`` says which one the
actual passed. ``tail_probability`` is the two-sided probability of an actual at least that far out
under the served quantiles (below ``1 - level`` for every anomaly). Values are float32, written as the
shortest text that reads back as that float32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

FORMAT = 1
_FIELDS = ("actual", "forecast", "lower", "upper", "tail_probability")


def _num(x: float) -> float | None:
    """The float64 whose shortest text is the float32 of ``x``'s (None when not finite)."""
    v = np.float32(x)
    return float(np.format_float_positional(v, unique=True, trim="-")) if np.isfinite(v) else None


def anomaly_messages(series: Sequence[str], ts: np.ndarray, actual: np.ndarray, forecast: np.ndarray,
                     lower: np.ndarray, upper: np.ndarray, tail: np.ndarray, level: float,
                     models: Sequence[tuple[str, str]], model_index: np.ndarray, issued_at: np.ndarray,
                     step_ms: int) -> list[tuple[str, bytes]]:
    """``(series, JSON bytes)`` per anomaly (the format of the module docstring); ``models[model_index[i]]``
    is the (name, version) of anomaly ``i``'s forecast."""
    out = []
    for i, s in enumerate(series):
        name, version = models[int(model_index[i])]
        a, lo, hi = float(actual[i]), float(lower[i]), float(upper[i])
        side = "above" if a > hi else "below"
        body = {"format": FORMAT, "series": s, "ts": int(ts[i]), "step_ms": int(step_ms),
                "actual": _num(a), "forecast": _num(forecast[i]), "lower": _num(lo), "upper": _num(hi),
                "level": float(level), "side": side, "tail_probability": _num(tail[i]),
                "model": {"name": name, "version": version}, "last_window_end": int(ts[i]),
                "issued_at": int(issued_at[i])}
        text = json.dumps(body, separators=(",", ":"))
        out.append((s, text.encode()))
    return out


def decode_anomaly(value: bytes | None) -> dict[str, Any] | None:
    """An anomaly message as a dict, or None when ``value`` is not one (any byte string gives one or
    the other)."""
    if value is None:
        return None
    try:
        msg = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(msg, dict) or msg.get("format") != FORMAT or not isinstance(msg.get("series"), str):
        return None
    model = msg.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("version"), str) \
            or not isinstance(model.get("name"), str):
        return None
    for k in ("ts", "step_ms", "last_window_end", "issued_at"):
        if not isinstance(msg.get(k), int) or isinstance(msg.get(k), bool):
            return None
    for k in (*_FIELDS, "level"):
        v = msg.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            return None
    if msg.get("side") not in ("above", "below"):
        return None
    return msg
