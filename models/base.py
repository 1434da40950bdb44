"""The shared base of every forecaster: config, normalisation, quantile head, loss, optimiser.

A model maps a context ``x`` of shape ``(B, L, C)`` (channel 0 is the target,
the others optional calendar features) to ``(B, H, Q)`` quantile forecasts in
the original scale. Each sample is normalised by its own context (location =
last value or mean, scale = standard deviation, floored by an epsilon for flat
series), the architecture works in that normalised space, and its output is
mapped back. The loss is the pinball loss in normalised space, so series of
very different levels weigh alike in a global model. Subclasses only build a
``backbone`` mapping ``(B, L, C) -> (B, D)`` and call :meth:`_build_head`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as lightning
import torch
from torch import Tensor, nn

from pipeline.errors import ModelConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "adadelta")
SCHEDULES = (None, "cosine", "plateau", "step")
NORMALISATIONS = ("last", "mean")
CALENDAR_CHANNELS = 4  # sin/cos hour of day, sin/cos day of week


@dataclass
class ModelConfig:
    """Fields every model shares; architectures subclass it with their own."""

    context: int = 96
    horizon: int = 24
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    calendar: bool = False
    normalise: str = "last"
    eps: float = 1e-5
    highway: bool = True
    # m, the season of the series: the lag of the seasonal-naive baseline (only that baseline reads it; every
    # config has it so that callers pass every model the same settings)
    season: int = 0
    # the lag of the baseline the network forecasts the residual over (0: none, 1: naive, m: seasonal naive)
    base_lag: int = 0
    dropout: float = 0.1
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    grad_clip: float = 1.0
    lr_schedule: str | None = None
    seed: int = 0

    # values of fields added after models were first saved: a saved config.json without the field
    # was trained with this value (``load_model`` fills them in), not with today's default
    legacy: ClassVar[dict[str, Any]] = {}
    # False for the baselines: they are a base themselves, and accept ``base_lag`` only to ignore it
    forecasts_residual: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.quantiles = tuple(float(q) for q in self.quantiles)
        problems = []
        if self.context < 2:
            problems.append(f"context must be >= 2 (got {self.context})")
        if self.horizon < 1:
            problems.append(f"horizon must be >= 1 (got {self.horizon})")
        qs = self.quantiles
        if not qs or any(not 0 < q < 1 for q in qs) or list(qs) != sorted(set(qs)) or 0.5 not in qs:
            problems.append(f"quantiles must be strictly increasing in (0, 1) and include 0.5 (got {qs})")
        if self.normalise not in NORMALISATIONS:
            problems.append(f"normalise must be one of {NORMALISATIONS} (got {self.normalise!r})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        if self.lr_schedule not in SCHEDULES:
            problems.append(f"lr_schedule must be one of {SCHEDULES} (got {self.lr_schedule!r})")
        if self.season < 0:
            problems.append(f"season must be >= 0 (got {self.season})")
        if self.base_lag < 0 or (self.forecasts_residual and self.base_lag >= self.context):
            problems.append(f"base_lag must be in [0, context) (got {self.base_lag})")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.learning_rate <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            problems.append("learning_rate and eps must be > 0, weight_decay and grad_clip >= 0")
        problems.extend(self.check())
        if problems:
            raise ModelConfigError(f"{type(self).__name__}: " + "; ".join(problems))

    def check(self) -> list[str]:
        """Architecture-specific problems; subclasses extend it."""
        return []

    @classmethod
    def upgrade(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """The fields of a config saved by any version (``config.json``), as this version names them."""
        fields = {**cls.legacy, **saved}  # fields saved before they existed keep their old value
        if "base_lag" not in saved and cls.forecasts_residual:
            # saved before the residual base had a name of its own: ``season`` was its lag
            fields["base_lag"] = saved.get("season", 0)
        return fields

    @property
    def channels(self) -> int:
        """C: input channels (target plus calendar features)."""
        return 1 + (CALENDAR_CHANNELS if self.calendar else 0)

    @property
    def median_index(self) -> int:
        return self.quantiles.index(0.5)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["quantiles"] = list(self.quantiles)
        return out


def seasonal_naive_index(context: int, horizon: int, lag: int) -> np.ndarray:
    """Where in a context ``y`` of length ``L = context`` seasonal naive of lag ``m`` takes each of its
    ``horizon`` steps: step ``h`` (1-based) is ``y[L + h - 1 - m * ceil(h / m)]``, the value a whole
    number of seasons before it (``m = 1``: naive, the last value). ``m`` is ``lag`` bounded to
    ``[1, context]``. The one definition used by the baselines, the residual base of every network and
    the live scores.

    >>> seasonal_naive_index(10, 5, 3).tolist()
    [7, 8, 9, 7, 8]
    """
    m = max(1, min(int(lag), int(context)))
    return int(context) - m + (np.arange(int(horizon)) % m)


def pinball_loss(pred: Tensor, target: Tensor, quantiles: Tensor) -> Tensor:
    """Mean pinball (quantile) loss; ``pred (B, H, Q)``, ``target (B, H)``, ``quantiles (Q,)``."""
    diff = target.unsqueeze(-1) - pred  # (B, H, Q)
    return torch.maximum(quantiles * diff, (quantiles - 1) * diff).mean()


class ForecastModel(lightning.LightningModule):
    """Context ``(B, L, C)`` in, quantiles ``(B, H, Q)`` out, in the original scale."""

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("quantiles", torch.tensor(config.quantiles, dtype=torch.float32), persistent=False)

    # -- building blocks for subclasses --------------------------------------------------
    def _build_head(self, features: int) -> None:
        cfg = self.config
        n_out = cfg.horizon * len(cfg.quantiles)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(features, n_out))
        # highway: a linear map from the normalised context straight to the output (LSTNet's
        # autoregressive component), so the network learns the non-linear rest.
        self.skip = nn.Linear(cfg.context, n_out) if cfg.highway else None
        # zero-initialised outputs: an untrained model forecasts exactly its base (naive, or seasonal
        # naive when ``base_lag`` > 0) and training moves away from it only as far as the data supports.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)
        # base_lag m > 0: the network forecasts the residual over the seasonal-naive forecast of lag m
        # y[t + h - m * ceil(h / m)] (m = 1: naive), so an untrained model starts at that baseline.
        if cfg.base_lag > 0:
            src = torch.as_tensor(seasonal_naive_index(cfg.context, cfg.horizon, cfg.base_lag))
            self.register_buffer("_base_src", src, persistent=False)
        else:
            self._base_src = None

    def backbone(self, x: Tensor) -> Tensor:
        """Normalised ``(B, L, C)`` -> features ``(B, D)``."""
        raise NotImplementedError

    # -- normalisation -------------------------------------------------------------------
    def scaling(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Location and scale ``(B, 1)`` of each sample's target context ``x (B, L, C)``."""
        y = x[..., 0]
        loc = y[:, -1:] if self.config.normalise == "last" else y.mean(dim=1, keepdim=True)
        # population std, at least eps, in two passes (mean, then mean squared deviation): the value of
        # ``y.std(dim=1, unbiased=False).clamp_min(eps)`` to float rounding, and much faster on a CPU
        # (BENCHMARKS.md). The variance is clamped before the root, so a flat context has a zero gradient
        # here, as with ``std``, not sqrt's NaN at 0.
        mean = loc if self.config.normalise == "mean" else y.mean(dim=1, keepdim=True)
        var = (y - mean).square().mean(dim=1, keepdim=True)
        scale = var.clamp_min(self.config.eps**2).sqrt()
        return loc, scale

    def forward_normalised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x (B, L, C)`` -> quantiles in normalised space ``(B, H, Q)``, loc and scale ``(B, 1)``."""
        loc, scale = self.scaling(x)
        xn = x.clone()
        xn[..., 0] = (x[..., 0] - loc) / scale
        out = self.head(self.backbone(xn))  # (B, H*Q)
        if self.skip is not None:
            out = out + self.skip(xn[..., 0])
        out = out.view(x.shape[0], self.config.horizon, len(self.config.quantiles))
        if self._base_src is not None:
            out = out + xn[:, self._base_src, 0].unsqueeze(-1)  # (B, H) -> (B, H, 1)
        return out.sort(dim=-1).values, loc, scale  # sorted: quantiles never cross

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, C)`` -> ``(B, H, Q)`` in the original scale."""
        z, loc, scale = self.forward_normalised(x)
        return z * scale.unsqueeze(-1) + loc.unsqueeze(-1)

    # -- training ------------------------------------------------------------------------
    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Pinball loss of the forecasts of ``x (B, L, C)`` against ``y (B, H)``, normalised."""
        z, loc, scale = self.forward_normalised(x)
        return pinball_loss(z, (y - loc) / scale, self.quantiles)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(*batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=batch[0].shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(*batch)
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=batch[0].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        cfg = self.config
        params, lr, wd = self.parameters(), cfg.learning_rate, cfg.weight_decay
        opt: torch.optim.Optimizer
        if cfg.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
        elif cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        elif cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=cfg.momentum,
                                  nesterov=cfg.nesterov and cfg.momentum > 0)
        elif cfg.optimizer == "rmsprop":
            opt = torch.optim.RMSprop(params, lr=lr, weight_decay=wd, momentum=cfg.momentum)
        elif cfg.optimizer == "adagrad":
            opt = torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
        else:
            opt = torch.optim.Adadelta(params, lr=lr, weight_decay=wd)
        if cfg.lr_schedule is None:
            return opt
        if cfg.lr_schedule == "cosine":
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        elif cfg.lr_schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        else:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}
        return {"optimizer": opt, "lr_scheduler": sched}

