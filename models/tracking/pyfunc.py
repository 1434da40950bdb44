"""The MLflow pyfunc face of a rollcast forecaster, logged as models-from-code.

:func:`models.tracking.runs.publish` logs this file with ``mlflow.pyfunc.log_model(python_model=<this
file>, artifacts={"model": <dir>, "serving": <json>})``; MLflow copies the file
into the model and runs it at load time, where ``set_model`` below names the
model object. Nothing is pickled: the forecaster is rebuilt by
``models.load_model`` from its ``state_dict`` and JSON config, and runs in ONNX
Runtime when the model directory holds its ONNX graph and that gives the
module's forecasts (``models.load_compiled``), else in eager PyTorch. Loading
needs the rollcast package installed (the model's requirements name it).

Input frame (recent closed windows, any order, at least ``context`` rows per series)::

    series: str    window_end: int64 (epoch ms)    value: float64 (the target; NaN = empty window)

Output frame (``horizon`` rows per series, ordered by series then step)::

    series: str    step: int64 (1..H)    ts: int64 (start of the forecast window, epoch ms)
    mean: float64 (the median)    q0.1, q0.5, q0.9, ...: float64 (one column per quantile)

``ts`` of step h is ``last window_end + (h-1) * window_length``, the
``window_start`` of that window in the history store and the ``ts`` of the
points in the forecasts topic.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from models.data import known_any

INPUT_COLUMNS = ("series", "window_end", "value")


def quantile_column(q: float) -> str:
    return f"q{q:g}"


def frame_to_context(frame: pd.DataFrame, context: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Series ids, the window ends ``(B, L)`` and target values ``(B, L)`` of each series' last
    ``context`` windows, from an input frame.

    Empty windows (NaN) are left as they are: :func:`models.predict` fills them by the one gap rule
    (:func:`models.data.fill_gaps`), as on every other path. A series whose last ``context`` windows
    hold no known value is not forecast (it has no row in the output); a warning counts them.
    """
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"input frame lacks column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    df = frame.loc[:, list(INPUT_COLUMNS)].copy()
    df["series"] = df["series"].astype(str)
    df["window_end"] = df["window_end"].astype("int64")
    df["value"] = df["value"].astype("float64")
    df = df.sort_values(["series", "window_end"], kind="stable").drop_duplicates(
        ["series", "window_end"], keep="last"
    )
    names, ends, rows, short, unknown = [], [], [], [], []
    for name, g in df.groupby("series", sort=True):
        tail = g["value"].to_numpy()[-context:]
        tail_ends = g["window_end"].to_numpy()[-context:]
        if len(tail) < context:
            short.append(f"{name} ({len(tail)})")
            continue
        if not known_any(tail):
            unknown.append(str(name))
            continue
        names.append(str(name))
        ends.append(tail_ends)
        rows.append(tail)  # gaps (NaN) stay: models.predict applies the gap rule
    if short:
        raise ValueError(f"need the last {context} windows of every series; too few for: {', '.join(short)}")
    if unknown:
        logging.getLogger("rollcast.pyfunc").warning(
            "%d series not forecast: no known value in their last %d windows (%s)", len(unknown), context,
            ", ".join(unknown[:5]))
    if not rows:
        raise ValueError("input frame has no series to forecast" + (" (none has a known value)" if unknown else ""))
    return names, np.stack(ends).astype(np.int64), np.stack(rows)


def forecast_frame(
    names: list[str], last_ends: np.ndarray, preds: np.ndarray, quantiles: list[float], step_ms: int
) -> pd.DataFrame:
    """The output frame (see the module docstring) from forecasts ``preds (B, H, Q)`` issued
    after windows ending at ``last_ends (B,)``."""
    b, h, _ = preds.shape
    steps = np.tile(np.arange(1, h + 1, dtype=np.int64), b)
    out = {
        "series": np.repeat(np.asarray(names, dtype=object), h),
        "step": steps,
        "ts": np.repeat(np.asarray(last_ends, dtype=np.int64), h) + (steps - 1) * step_ms,
        "mean": preds[:, :, quantiles.index(0.5)].reshape(-1).astype(np.float64),
    }
    for j, q in enumerate(quantiles):
        out[quantile_column(q)] = preds[:, :, j].reshape(-1).astype(np.float64)
    return pd.DataFrame(out)


class RollcastForecaster(PythonModel):
    """Forecasts for a frame of recent windows with a saved rollcast model."""

    def load_context(self, context: Any) -> None:
        import models

        model_dir = Path(context.artifacts["model"])
        self.model = models.load_model(model_dir)
        self.compiled = models.load_compiled(model_dir, self.model)  # None: the module runs
        self.serving = json.loads(Path(context.artifacts["serving"]).read_text())

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import models

        cfg = self.model.config
        names, ends, ctx = frame_to_context(pd.DataFrame(model_input), int(cfg.context))
        runner = self.model if self.compiled is None else self.compiled
        preds = np.asarray(models.predict(runner, ctx, window_end_ms=ends))  # (B, H, Q)
        return forecast_frame(names, ends[:, -1], preds, [float(q) for q in cfg.quantiles], int(self.serving["step_ms"]))


mlflow.models.set_model(RollcastForecaster())
