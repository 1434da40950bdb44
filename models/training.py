"""Fitting a model with Lightning: seeded, early-stopped on validation loss, best weights kept.

The untrained model is a candidate too: its outputs start at zero residual, so
it forecasts exactly its base (naive or seasonal naive); when no epoch beats
that on validation, the base is what ``fit`` returns (``best_epoch = -1``).

>>> # result = fit(create_model("tcn"), train, val, max_epochs=20)
>>> # result.train_loss, result.val_loss  # one float per epoch
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as lightning
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping
from torch.utils.data import DataLoader, TensorDataset

from models.base import ForecastModel
from models.data import Samples
from pipeline.errors import NotEnoughData


@dataclass
class FitResult:
    """Per-epoch mean pinball losses (normalised scale) and where training stopped.

    ``best_epoch`` is the epoch whose weights were kept, -1 for the untrained
    start, None without validation data.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    epochs: int = 0
    samples_per_s: float = 0.0


class _History(Callback):
    """Records epoch losses and keeps the weights of the best validation epoch."""

    def __init__(self, result: FitResult, start_loss: float | None = None, start_state: dict | None = None):
        self.result = result
        self.best = float("inf") if start_loss is None else start_loss
        self.best_state: dict[str, torch.Tensor] | None = start_state
        if start_loss is not None:
            result.best_epoch = -1

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.result.train_loss.append(float(metrics["train_loss"]))
        self.result.epochs += 1
        if "val_loss" in metrics:
            val = float(metrics["val_loss"])
            self.result.val_loss.append(val)
            if val < self.best:
                self.best = val
                self.result.best_epoch = self.result.epochs - 1
                self.best_state = copy.deepcopy(pl_module.state_dict())


def _loader(samples: Samples, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    ds = TensorDataset(torch.from_numpy(samples.x), torch.from_numpy(samples.y))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None)


def _loss_on(model: ForecastModel, samples: Samples, batch_size: int = 4096) -> float:
    """Mean loss of ``model`` (eval mode) over ``samples``, weighted by batch size like Lightning's."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            x, y = torch.from_numpy(samples.x[i : i + batch_size]), torch.from_numpy(samples.y[i : i + batch_size])
            total += float(model.loss(x, y)) * len(x)
    model.train(was_training)
    return total / len(samples)


def fit(
    model: ForecastModel,
    train: Samples,
    val: Samples | None = None,
    max_epochs: int = 20,
    batch_size: int = 256,
    seed: int | None = None,
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    patience: int = 5,
    max_steps: int = -1,
    accelerator: str = "auto",
) -> FitResult:
    """Train ``model`` in place on ``train``; early stopping and best weights on ``val`` if given.

    ``seed`` (default: the model config's) makes CPU training reproducible.
    Baselines (``model.trainable`` false) return an empty result.
    """
    import time

    result = FitResult()
    if not model.trainable:
        return result
    if len(train) == 0:
        raise NotEnoughData("no training samples: the history is shorter than context + horizon")
    seed = model.config.seed if seed is None else seed
    lightning.seed_everything(seed, workers=True, verbose=False)
    has_val = val is not None and len(val) > 0
    if has_val:
        assert val is not None
        history = _History(result, _loss_on(model, val), copy.deepcopy(model.state_dict()))
    else:
        history = _History(result)
    cbs: list[Callback] = [history, *callbacks]
    if has_val:
        cbs.append(EarlyStopping(monitor="val_loss", patience=patience, mode="min"))
    for logger_name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    trainer = lightning.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        gradient_clip_val=model.config.grad_clip or None,
        deterministic=True,
        callbacks=cbs,
    )
    loaders: dict[str, Any] = {"train_dataloaders": _loader(train, batch_size, True, seed)}
    if has_val:
        assert val is not None
        loaders["val_dataloaders"] = _loader(val, max(batch_size, 1024), False, seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(model, **loaders)
    elapsed = time.perf_counter() - t0
    result.samples_per_s = len(train) * max(result.epochs, 1) / max(elapsed, 1e-9)
    if history.best_state is not None:
        model.load_state_dict(history.best_state)
    model.cpu().eval()
    return result
