"""The model registry: every architecture is registered by name with its config dataclass.

``create_model(name, **config)`` is the only way jobs build a model, so they
never branch on the name (timm's ``create_model``).

>>> "tcn" in available_models()
True
>>> create_model("tcn", context=48, horizon=12).config.horizon
12
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.errors import ModelConfigError

if TYPE_CHECKING:
    from models.base import ForecastModel, ModelConfig
    from pipeline.config import ModelSettings

_REGISTRY: dict[str, tuple[type[ForecastModel], type[ModelConfig]]] = {}

M = TypeVar("M", bound="type[ForecastModel]")


def register_model(name: str, config_cls: type[ModelConfig]) -> Callable[[M], M]:
    """Class decorator: make ``cls(config)`` buildable as ``create_model(name, ...)``."""

    def wrap(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = (cls, config_cls)
        cls.name = name
        return cls

    return wrap


def available_models() -> list[str]:
    """Names ``create_model`` accepts, sorted."""
    return sorted(_REGISTRY)


def config_class(name: str) -> type[ModelConfig]:
    """The config dataclass of a registered model."""
    return _lookup(name)[1]


def make_config(name: str, **config: Any) -> ModelConfig:
    """Build and validate the config of ``name``; unknown fields are a :class:`ModelConfigError`."""
    cfg_cls = _lookup(name)[1]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ModelConfigError(
            f"model {name!r} has no setting(s) {unknown}; its settings are {sorted(known)}"
        )
    try:
        return cfg_cls(**config)
    except (TypeError, ValueError) as e:
        raise ModelConfigError(f"model {name!r}: invalid config: {e}") from e


def config_from_settings(settings: ModelSettings, name: str, **overrides: Any) -> dict[str, Any]:
    """The config of model ``name`` from the ``model.*`` settings, then ``overrides`` (a command's own
    options), then ``model.params[name]``: the one way training and backtests configure a model.

    Only the fields the model's config has are taken, so the same settings configure every model.
    """
    fields = {f.name for f in dataclasses.fields(config_class(name))}
    base: dict[str, Any] = {
        "context": settings.context,
        "horizon": settings.horizon,
        "quantiles": list(settings.quantiles),
        "learning_rate": settings.learning_rate,
        "seed": settings.seed,
        "season": settings.season,
        "base_lag": settings.season,
        **overrides,
    }
    config = {k: v for k, v in base.items() if k in fields}
    config.update(settings.params.get(name, {}))
    return config


def create_model(name: str, **config: Any) -> ForecastModel:
    """Build model ``name`` from keyword overrides of its config dataclass, initialised from its seed."""
    import torch

    cls, _ = _lookup(name)
    cfg = make_config(name, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the same config always starts from the same weights
        return cls(cfg)


def _lookup(name: str) -> tuple[type[ForecastModel], type[ModelConfig]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelConfigError(
            f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}"
        ) from None
