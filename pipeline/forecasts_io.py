"""Forecasts on the ``forecasts`` topic: one JSON message per series and closed window, keyed by series.

The format (DESIGN.md, README "Message formats")::

    {"series": "demand", "issued_at": 1795432000000, "last_window_end": 1399334400000,
     "model": {"name": "tcn", "version": "3"}, "step_ms": 3600000,
     "points": [{"ts": 1399334400000, "mean": 5.56, "quantiles": {"0.1": 4.07, "0.5": 5.56, "0.9": 6.73}}]}

The forecast job encodes messages with :func:`forecast_message_chunks` (thousands per batch);
readers such as ``rollcast query`` decode them with :func:`decode_forecast`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import polars as pl


class ModelId(Protocol):
    """What a forecast message says of the model that made it (a :class:`models.serving.forecaster.LoadedModel`)."""

    name: str
    version: str
    quantiles: list[float]


def forecast_message_chunks(
    series: list[str],
    last_ends: list[int] | np.ndarray,
    preds: np.ndarray,
    model: ModelId,
    step_ms: int,
    issued_at: int | np.ndarray,
    chunk: int | None = None,
    model_preds: np.ndarray | None = None,
) -> Iterator[list[tuple[str, bytes]]]:
    """One JSON forecast per row of ``preds`` (B, H, Q), in DESIGN.md's format, as ``(series, bytes)``
    pairs in lists of ``chunk`` (one list of all if None).

    ``preds`` are the quantiles served. With ``model_preds`` (the model's own, same shape), ``preds`` are
    the calibrated ones: the message says ``"calibrated": true`` and every point carries the model's
    own as ``model_quantiles`` too; otherwise ``"calibrated": false``. ``issued_at``: one for all, or
    one per row.

    Point ``h`` (1-based) covers the window starting at ``last_window_end + (h-1)*step_ms``;
    its ``ts`` is that window's start, matching ``window_start`` in the history store.
    The text of every point is built for the whole batch in one pass; only the documents are
    assembled per chunk, so a caller can send each chunk while the next is assembled. Building
    everything per chunk instead repeated polars' per-call overhead for every chunk.
    """
    # The JSON text is assembled column-wise by polars string expressions (one pass over all points,
    # then one join per message): less time than building nested structs for write_ndjson, and much
    # less than per-message dicts through a JSON encoder, at 1,000+ forecasts a batch (BENCHMARKS.md).
    # Values are the model's float32 outputs, written as the shortest decimal that reads back as
    # that float32 (``99.33948``, not float64's ``99.3394775390625``): no precision is lost, and the
    # messages are a quarter smaller to build, send, store and parse. Non-finite values become null.
    preds = np.asarray(preds, dtype=np.float32)
    n, horizon, _ = preds.shape
    if n == 0:
        return
    median = model.quantiles.index(0.5)
    ends = np.asarray(last_ends, dtype=np.int64)

    finite = bool(np.isfinite(preds).all())

    def number(values: np.ndarray) -> pl.Expr:
        x = pl.lit(pl.Series(values.ravel()))
        return x.cast(pl.String) if finite else pl.when(x.is_finite()).then(x.cast(pl.String)).otherwise(pl.lit("null"))

    ts = (ends[:, None] + np.arange(horizon, dtype=np.int64)[None] * step_ms).ravel()
    # each quantile's text once (the mean is the median's text), all of them in one parallel query
    sets = [preds] if model_preds is None else [preds, np.asarray(model_preds, dtype=np.float32)]
    if len(sets) > 1:
        finite = finite and bool(np.isfinite(sets[1]).all())
    nq = len(model.quantiles)
    texts = [pl.lit(t) for t in pl.select([number(x[:, :, j]).alias(f"{k}.{j}")
                                           for k, x in enumerate(sets) for j in range(nq)]).get_columns()]
    parts: list[pl.Expr] = [pl.lit('{"ts":'), pl.lit(pl.Series(ts)).cast(pl.String),
                            pl.lit(',"mean":'), texts[median]]
    for k, name in enumerate(["quantiles", "model_quantiles"][: len(sets)]):
        for j, q in enumerate(model.quantiles):
            parts += [pl.lit((f'{"}" if k else ""},"{name}":{{' if j == 0 else ",") + json.dumps(f"{q:g}") + ":"),
                      texts[k * nq + j]]
    parts.append(pl.lit("}}"))
    points = pl.select(pl.concat_str(parts))[:, 0].reshape((n, horizon)).arr.join(",")
    names = pl.Series(series, dtype=pl.String)
    if names.str.contains(r'["\\\x00-\x1f]').any():  # needs escaping: let the JSON encoder do it
        names = pl.Series([json.dumps(x) for x in series], dtype=pl.String)
    else:
        names = '"' + names + '"'
    if np.ndim(issued_at):
        head = ',"issued_at":' + pl.Series(np.asarray(issued_at, dtype=np.int64)).cast(pl.String) \
            + ',"last_window_end":'
    else:
        head = pl.Series([f',"issued_at":{int(issued_at)},"last_window_end":']).extend_constant(
            f',"issued_at":{int(issued_at)},"last_window_end":', n - 1)
    mid = (',"model":' + json.dumps({"name": model.name, "version": model.version}, separators=(",", ":"))
           + f',"step_ms":{int(step_ms)},"calibrated":{"true" if model_preds is not None else "false"},'
           + '"points":[')
    ends_text = pl.Series(ends).cast(pl.String)
    step = chunk or n
    for lo in range(0, n, step):
        lines = pl.select(pl.concat_str([
            pl.lit('{"series":'), pl.lit(names[lo:lo + step]), pl.lit(head[lo:lo + step]),
            pl.lit(ends_text[lo:lo + step]),
            pl.lit(mid), pl.lit(points[lo:lo + step]), pl.lit("]}"),
        ]).cast(pl.Binary))[:, 0].to_list()
        yield list(zip(series[lo:lo + step], lines, strict=True))


def decode_forecast(value: bytes | None) -> dict[str, Any] | None:
    """A forecast message as a dict, or None when ``value`` is not one (not JSON, or without the
    ``series`` and ``last_window_end`` fields)."""
    if value is None:
        return None
    try:
        msg = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("series"), str) \
            or not isinstance(msg.get("last_window_end"), int):
        return None
    return msg
