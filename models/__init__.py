"""Forecasting models behind one registry, plus their data preparation, training and judging.

The public surface other jobs use:

- :func:`create_model` / :func:`available_models` — build any model by name;
- :func:`save_model` / :func:`load_model` — ``config.json`` + ``weights.pt`` directories;
- :func:`predict` — batched plain-PyTorch inference, ``(B, L)`` values -> ``(B, H, Q)``;
- :func:`make_inputs` — the ``(B, L, C)`` model input with calendar features when configured;
- submodules :mod:`models.data`, :mod:`models.train.fit`, :mod:`models.metrics`,
  :mod:`models.train.backtest`.
"""

from __future__ import annotations

# Importing the architectures runs their @register_model decorators (timm's models/__init__.py does the
# same): importing any module of this package fills the registry, and the registry imports none of them.
from models import baselines, hrnn, lstm, pyramid, tcn  # noqa: F401
from models.base import ForecastModel, ModelConfig
from models.data import make_inputs
from models.io import load_model, predict, save_model
from models.registry import available_models, config_class, create_model, register_model

__all__ = [
    "ForecastModel",
    "ModelConfig",
    "available_models",
    "config_class",
    "create_model",
    "load_model",
    "make_inputs",
    "predict",
    "register_model",
    "save_model",
]
