"""Baselines behind the same interface: naive and seasonal naive, no training.

The median is the baseline's point forecast; the other quantiles add the
empirical quantiles of the same method's in-context errors (lag-1 changes for
naive, lag-m changes for seasonal naive), centred on their median and widened
by the square root of the number of steps (or seasons) ahead, as for a random walk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from models.base import ForecastModel, ModelConfig, seasonal_naive_index
from models.registry import register_model


@dataclass
class BaselineConfig(ModelConfig):
    """A baseline is a base itself: it accepts ``base_lag`` (callers pass every model the same settings)
    and ignores it."""

    forecasts_residual: ClassVar[bool] = False


@dataclass
class NaiveConfig(BaselineConfig):
    pass


@dataclass
class SeasonalNaiveConfig(BaselineConfig):
    season: int = 24  # its lag m

    def check(self) -> list[str]:
        if not 1 <= self.season < self.context:
            return [f"season must be in [1, context) (got season={self.season}, context={self.context})"]
        return []


class _Baseline(ForecastModel):
    trainable: ClassVar[bool] = False
    lag: int = 1

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self._base_src = None
        h = torch.arange(1, config.horizon + 1)
        k = torch.ceil(h / self.lag).long()  # seasons (or steps) ahead, per horizon step
        self.register_buffer("_src", torch.as_tensor(seasonal_naive_index(config.context, config.horizon, self.lag)),
                             persistent=False)
        self.register_buffer("_widen", k.float().sqrt(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = x[..., 0]  # (B, L)
        point = y[:, self._src]  # (B, H): y[t + h - m * ceil(h / m)] (models.base.seasonal_naive_index)
        err = y[:, self.lag :] - y[:, : -self.lag]  # (B, L - m)
        q = torch.quantile(err, self.quantiles, dim=1).T  # (B, Q)
        spread = q - q[:, self.config.median_index : self.config.median_index + 1]
        return point.unsqueeze(-1) + spread.unsqueeze(1) * self._widen.view(1, -1, 1)  # (B, H, Q)

    def forward_normalised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loc, scale = self.scaling(x)
        return (self(x) - loc.unsqueeze(-1)) / scale.unsqueeze(-1), loc, scale


@register_model("naive", NaiveConfig)
class Naive(_Baseline):
    lag = 1


@register_model("seasonal_naive", SeasonalNaiveConfig)
class SeasonalNaive(_Baseline):
    def __init__(self, config: SeasonalNaiveConfig):
        self.lag = config.season
        super().__init__(config)
