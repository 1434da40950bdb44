"""Saving, loading and batched inference in plain PyTorch (no Trainer).

A saved model is a directory with ``config.json`` (``{"name": ..., "config":
{...}}``, the config dataclass fields) and ``weights.pt`` (the ``state_dict``,
loaded with ``weights_only=True``): nothing is unpickled, and the architecture
is rebuilt through the registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.base import ForecastModel
from models.data import fill_gaps, known_any, make_inputs
from models.registry import config_class, create_model
from pipeline.errors import ModelConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


def save_model(model: ForecastModel, directory: str | Path) -> Path:
    """Write ``config.json`` and ``weights.pt`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"name": model.name, "config": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
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
    model: ForecastModel,
    context: np.ndarray,
    window_end_ms: np.ndarray | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Forecast ``(B, H, Q)`` in the original scale from the last ``L`` target values ``(B, L)``.

    ``window_end_ms`` (``(B, L)`` or ``(L,)``) is needed only by models with
    calendar features; callers can always pass it. Gaps (NaN) follow the one gap
    rule, :func:`models.data.fill_gaps`; a context with no known value gets NaN
    forecasts (callers count those contexts and do not publish them).
    """
    context = np.asarray(context, dtype=np.float64)
    if context.ndim == 1:
        context = context[None]
    L, H, Q = model.config.context, model.config.horizon, len(model.config.quantiles)
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
            out[usable] = predict(model, context[usable], ends, batch_size)
        return out
    x = make_inputs(context, window_end_ms, model.config)
    was_training = model.training
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            outs.append(model(torch.from_numpy(x[i : i + batch_size])).numpy())
    model.train(was_training)
    if not outs:
        return np.zeros((0, H, Q), np.float32)
    return np.concatenate(outs)
