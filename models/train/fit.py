"""Fitting a model with Lightning: seeded, early-stopped on validation loss, best weights kept.

The untrained model is a candidate too: its outputs start at zero residual, so
it forecasts exactly its base (naive or seasonal naive); when no epoch beats
that on validation, the base is what ``fit`` returns (``best_epoch = -1``).

>>> # result = fit(create_model("tcn"), train, val, max_epochs=20)
>>> # result.train_loss, result.val_loss  # one float per epoch
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as lightning
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping
from torch.utils.data import DataLoader, Dataset, TensorDataset

from models.base import ForecastModel
from models.data import Samples
from models.train.sampling import WindowSamples, as_batch
from pipeline.errors import NotEnoughData

log = logging.getLogger("rollcast.train")


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
    global_rank: int = 0  # of this process under DDP: only rank 0 scores, logs and registers


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


class _Resample(Callback):
    """Draws each epoch's plan of a :class:`WindowSamples` training set before the epoch's batches."""

    def __init__(self, samples: WindowSamples):
        self.samples = samples

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self.samples.set_epoch(trainer.current_epoch)


class _Progress(Callback):
    """One log line per epoch (rank 0): epoch, samples/s, train and validation loss."""

    def __init__(self, samples: int, max_epochs: int):
        self.samples, self.max_epochs, self.t0 = samples, max_epochs, 0.0

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self.t0
        m = trainer.callback_metrics
        val = f", validation loss {float(m['val_loss']):.5g}" if "val_loss" in m else ""
        log.info("epoch %d/%d: %d samples in %.1fs (%.0f samples/s), train loss %.5g%s",  # all ranks' samples
                 trainer.current_epoch + 1, self.max_epochs, self.samples, seconds,
                 self.samples / max(seconds, 1e-9), float(m.get("train_loss", float("nan"))), val)


TrainData = Samples | WindowSamples


def _loader(samples: TrainData, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    if isinstance(samples, Dataset):  # drawn per batch; the plan is already in random order
        return DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=as_batch)
    ds = TensorDataset(torch.from_numpy(samples.x), torch.from_numpy(samples.y))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None)


def _batches(samples: TrainData, batch_size: int) -> Any:
    for i in range(0, len(samples), batch_size):
        if isinstance(samples, WindowSamples):
            yield samples.__getitems__(list(range(i, min(i + batch_size, len(samples)))))
        else:
            yield torch.from_numpy(samples.x[i : i + batch_size]), torch.from_numpy(samples.y[i : i + batch_size])


def _loss_on(model: ForecastModel, samples: TrainData, batch_size: int = 4096) -> float:
    """Mean loss of ``model`` (eval mode) over ``samples``, weighted by batch size like Lightning's."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in _batches(samples, batch_size):
            total += float(model.loss(x, y)) * len(x)
    model.train(was_training)
    return total / len(samples)


def fit(
    model: ForecastModel,
    train: TrainData,
    val: TrainData | None = None,
    max_epochs: int = 20,
    batch_size: int = 256,
    seed: int | None = None,
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    patience: int = 5,
    max_steps: int = -1,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    learning_rate: float | None = None,
) -> FitResult:
    """Train ``model`` in place on ``train``; early stopping and best weights on ``val`` if given.

    ``train`` and ``val``: a :class:`WindowSamples` plan (drawn anew each epoch), as every training cycle and
    backtest refit passes (:func:`models.train.sampling.training_samples`), or materialised :class:`Samples`
    (small sets built by hand). ``seed`` (default: the model config's) makes CPU training reproducible. ``accelerator``,
    ``devices``, ``strategy`` and ``num_nodes`` go to Lightning's Trainer (``strategy="ddp"``: one process
    per device, launched by Lightning or by torchrun/SLURM; ``result.global_rank`` says which one this is).
    ``learning_rate`` overrides the config's for this fit only (a warm start), the saved config unchanged.
    Baselines (``model.trainable`` false) return an empty result.
    """
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
    cbs: list[Callback] = [history, _Progress(len(train), max_epochs), *callbacks]
    if isinstance(train, WindowSamples):
        cbs.append(_Resample(train))
    if has_val:
        cbs.append(EarlyStopping(monitor="val_loss", patience=patience, mode="min"))
    for logger_name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    trainer = lightning.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        gradient_clip_val=model.config.grad_clip or None,
        deterministic=True if accelerator == "cpu" else "warn",  # some CUDA kernels have no deterministic form
        callbacks=cbs,
    )
    loaders: dict[str, Any] = {"train_dataloaders": _loader(train, batch_size, True, seed)}
    if has_val:
        assert val is not None
        loaders["val_dataloaders"] = _loader(val, max(batch_size, 1024), False, seed)
    config = model.config
    if learning_rate is not None:
        model.config = dataclasses.replace(config, learning_rate=learning_rate)
    model.train()  # a loaded model (a warm start) comes in eval mode; Lightning keeps the modes it finds
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            trainer.fit(model, **loaders)
    finally:
        model.config = config
    elapsed = time.perf_counter() - t0
    result.global_rank = trainer.global_rank
    result.samples_per_s = len(train) * max(result.epochs, 1) / max(elapsed, 1e-9)
    if history.best_state is not None:
        model.load_state_dict(history.best_state)
    model.cpu().eval()
    return result
