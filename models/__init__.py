"""Forecasting models behind one registry, plus their data preparation, training and judging.

The public surface other jobs use:

- :func:`create_model` / :func:`available_models` — build any model by name;
- :func:`save_model` / :func:`load_model` — ``config.json`` + ``weights.pt`` (+ ``model.onnx``) directories;
- :func:`load_compiled` — a saved model's ONNX graph in ONNX Runtime, checked against the module
  (:mod:`models.compiled`; None when it has none or it does not match: then the module runs);
- :func:`predict` — batched inference, ``(B, L)`` values -> ``(B, H, Q)``, with a module (eager
  PyTorch) or its compiled form;
- :func:`make_inputs` — the ``(B, L, C)`` model input with calendar features when configured;
- submodules :mod:`models.data`, :mod:`models.train.fit`, :mod:`models.metrics`,
  :mod:`models.train.backtest`.
"""

from __future__ import annotations

# Importing the architectures runs their @register_model decorators (timm's models/__init__.py does the
# same): importing any module of this package fills the registry, and the registry imports none of them.
from models import baselines, hrnn, lstm, pyramid, tcn  # noqa: F401
from models.base import ForecastModel, ModelConfig
from models.compiled import OnnxModel, load_compiled
from models.data import make_inputs
from models.io import load_model, predict, save_model
from models.registry import available_models, config_class, create_model, register_model

__all__ = [
    "ForecastModel",
    "ModelConfig",
    "OnnxModel",
    "available_models",
    "config_class",
    "create_model",
    "load_compiled",
    "load_model",
    "make_inputs",
    "predict",
    "register_model",
    "save_model",
]
