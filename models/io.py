"""Saving, loading and batched inference (no Trainer), in eager PyTorch or compiled.

A saved model is a directory with ``config.json`` (``{"name": ..., "config":
{...}}``, the config dataclass fields) and ``weights.pt`` (the ``state_dict``,
loaded with ``weights_only=True``): nothing is unpickled, and the architecture
is rebuilt through the registry. Beside them, ``model.onnx`` is its compiled
form when the exporter can make one (:mod:`models.compiled`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.base import ForecastModel, ModelConfig
from models.compiled import ONNX_FILE, OnnxModel, eval_mode, export_onnx
from models.data import fill_gaps, known_any, make_inputs
from models.registry import config_class, create_model
from pipeline.errors import ModelConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


def save_model(model: ForecastModel, directory: str | Path, compiled: bool = True) -> Path:
    """Write ``config.json`` and ``weights.pt`` into ``directory`` (created if needed), and with
    ``compiled`` the ONNX graph ``model.onnx`` when the exporter can make one (0.2-2 s; a warning when
    it cannot, and the model then serves in eager PyTorch)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"name": model.name, "config": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / ONNX_FILE).unlink(missing_ok=True)  # an older model's graph: never beside these weights
    if compiled:
        export_onnx(model, directory / ONNX_FILE)
    return directory


def load_model(directory: str | Path) -> ForecastModel:
    """Rebuild a model saved by :func:`save_model`, in eval mode."""
    directory = Path(directory)
    try:
        spec = json.loads((directory / CONFIG_FILE).read_text())
        name, config = spec["name"], spec["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelConfigError(f"{directory} is not a saved rollcast model ({CONFIG_FILE}: {e})") from e
    config = config_class(name).upgrade(config)  # saved by an earlier version: today's names
    model = create_model(name, **config)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def predict(
    model: ForecastModel | OnnxModel,
    context: np.ndarray,
    window_end_ms: np.ndarray | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Forecast ``(B, H, Q)`` in the original scale from the last ``L`` target values ``(B, L)``.

    ``model`` is a module, run in eager PyTorch, or its compiled form (:class:`models.compiled.OnnxModel`):
    both get the same inputs. ``window_end_ms`` (``(B, L)`` or ``(L,)``) is needed only by models with
    calendar features; callers can always pass it. Gaps (NaN) follow the one gap rule,
    :func:`models.data.fill_gaps`; a context with no known value gets NaN forecasts (callers count
    those contexts and do not publish them).
    """
    if isinstance(model, ForecastModel):
        with eval_mode(model), torch.inference_mode():
            return _forecast(model.config, lambda x: model(torch.from_numpy(x)).numpy(), context, window_end_ms,
                             batch_size)
    return _forecast(model.config, model.run, context, window_end_ms, batch_size)


def _forecast(config: ModelConfig, run: Callable[[np.ndarray], np.ndarray], context: np.ndarray,
              window_end_ms: np.ndarray | None, batch_size: int) -> np.ndarray:
    """:func:`predict` with ``run`` mapping model inputs ``(b, L, C)`` to ``(b, H, Q)``, ``batch_size`` rows
    at a time."""
    context = np.asarray(context, dtype=np.float64)
    if context.ndim == 1:
        context = context[None]
    L, H, Q = config.context, config.horizon, len(config.quantiles)
    if context.shape[1] < L:
        raise ModelConfigError(f"model needs a context of {L} steps, got {context.shape[1]}")
    context = context[:, -L:]
    if window_end_ms is not None:
        window_end_ms = np.asarray(window_end_ms)[..., -L:]
    gaps = np.isnan(context).any()  # the usual case is none: no pass over the contexts to fill them
    if gaps:
        context = fill_gaps(context)
    usable = known_any(context) if gaps else None
    if usable is not None and not usable.all():  # forecast the others; these stay NaN
        out = np.full((len(context), H, Q), np.nan, np.float32)
        if usable.any():
            ends = window_end_ms[usable] if window_end_ms is not None and window_end_ms.ndim == 2 else window_end_ms
            out[usable] = _forecast(config, run, context[usable], ends, batch_size)
        return out
    x = make_inputs(context, window_end_ms, config)
    outs = [run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if not outs:
        return np.zeros((0, H, Q), np.float32)
    return np.concatenate(outs)
