"""Training samples drawn from a :class:`~models.data.SeriesMatrix` per batch, never materialised.

A sample is a pair ``(s, t)``: series ``s``, context steps ``[t - L, t)``, targets ``[t, t + H)``.
:func:`draw_plan` draws the pairs of one epoch over (series, time) from a target span: every valid
pair once in a shuffled order when the span holds no more than the budget, else ``budget`` pairs drawn
with replacement, uniformly or weighted towards recent targets (half-life in windows). Valid pairs are
those whose window lies after the series' first value and whose context holds a known value.
:class:`WindowSamples` is the map-style dataset over a plan: its ``__getitems__`` (which
:class:`torch.utils.data.DataLoader` calls with a whole batch of indices) gathers contexts and targets
with one fancy index, applies the gap rule (:func:`models.data.fill_gaps`) and adds calendar channels.
Memory: the matrix plus one batch. :func:`training_samples` is the one way a fit's training and
validation samples are drawn from the ``train.*`` settings: by a training cycle and by every refit of
a backtest (:mod:`models.train.backtest`).

>>> # ds = WindowSamples(matrix, 96, 24, calendar=True, span=(96, 4000), budget=65536, seed=0)
>>> # ds.set_epoch(1)  # a new draw, deterministic from (seed, epoch)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from models.base import CALENDAR_CHANNELS, ModelConfig
from models.data import SeriesMatrix, calendar_features, fill_gaps, first_values
from pipeline.errors import NotEnoughData

if TYPE_CHECKING:
    from pipeline.config import TrainSettings

_MAX_ROUNDS = 64  # rejection rounds for contexts without a known value before giving up


def draw_plan(
    matrix: SeriesMatrix,
    context: int,
    horizon: int,
    span: tuple[int, int],
    budget: int,
    rng: np.random.Generator,
    half_life: float | None = None,
    first: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(series, t)`` int64 arrays of one epoch's samples with targets ``[t, t + H)`` inside ``span``.

    ``first``: :func:`models.data.first_values` of the matrix (computed when not given).
    """
    lo, hi = max(span[0], context), span[1]
    t_max = hi - horizon  # the last target start
    first = first_values(matrix.values) if first is None else first
    lo_s = np.maximum(lo, first + context)  # (S,) no context reaching before the series' first value
    count = np.clip(t_max - lo_s + 1, 0, None)
    total = int(count.sum())
    empty = np.zeros(0, np.int64)
    if total == 0:
        return empty, empty
    if half_life is None and total <= budget:  # every valid sample once, shuffled: one pass
        s = np.repeat(np.arange(len(count)), count)
        t = np.arange(total) - np.repeat(np.cumsum(count) - count, count) + np.repeat(lo_s, count)
        keep = _has_known(matrix, s, t, context)
        s, t = s[keep], t[keep]
        order = rng.permutation(len(s))
        return s[order], t[order]
    n = min(budget, total)
    steps = np.arange(matrix.values.shape[1], dtype=np.float64)
    w = np.ones_like(steps) if half_life is None else 0.5 ** ((t_max - steps) / half_life)
    w[steps > t_max] = 0.0
    cw = np.concatenate([[0.0], np.cumsum(w)])  # mass of [a, b] = cw[b + 1] - cw[a]
    valid = count > 0
    mass = np.where(valid, cw[np.minimum(t_max + 1, len(cw) - 1)] - cw[np.minimum(lo_s, len(cw) - 1)], 0.0)
    p = mass / mass.sum()
    out_s, out_t, have = [], [], 0
    for _ in range(_MAX_ROUNDS):
        k = n - have
        s = rng.choice(len(p), size=k, p=p)
        u = cw[lo_s[s]] + rng.random(k) * mass[s]
        t = np.clip(np.searchsorted(cw, u, side="right") - 1, lo_s[s], t_max)
        keep = _has_known(matrix, s, t, context)
        out_s.append(s[keep])
        out_t.append(t[keep])
        have += int(keep.sum())
        if have >= n:
            return np.concatenate(out_s).astype(np.int64), np.concatenate(out_t).astype(np.int64)
    raise NotEnoughData(f"found {have} of {n} samples with a known value in their context in {span}: "
                        "the span is almost all gaps")


def _has_known(matrix: SeriesMatrix, s: np.ndarray, t: np.ndarray, context: int, chunk: int = 65536) -> np.ndarray:
    """Whether the context ``[t - L, t)`` of series ``s`` holds a known value (the gap rule forecasts only those)."""
    if matrix.known is None:
        return np.ones(len(s), dtype=bool)
    offs = np.arange(-context, 0)
    out = np.empty(len(s), dtype=bool)
    for a in range(0, len(s), chunk):
        out[a : a + chunk] = matrix.known[s[a : a + chunk, None], t[a : a + chunk, None] + offs].any(axis=1)
    return out


def gather(matrix: SeriesMatrix, s: np.ndarray, t: np.ndarray, context: int, horizon: int,
           calendar: bool) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs ``x (B, L, C)`` and targets ``y (B, H)`` (float32) of the samples ``(s, t)``: context
    steps ``[t - L, t)`` through the gap rule (:func:`models.data.fill_gaps`), plus calendar channels of
    their window ends if ``calendar``; targets ``[t, t + H)``."""
    cols = t[:, None] + np.arange(-context, horizon)  # (B, L + H)
    win = matrix.values[s[:, None], cols]
    ctx = win[:, :context]
    if matrix.known is not None:  # the gaps back as NaN, then the gap rule
        ctx = fill_gaps(np.where(matrix.known[s[:, None], cols[:, :context]], ctx, np.nan))
    x = ctx.astype(np.float32)[..., None]  # (B, L, 1)
    if calendar:
        cal = calendar_features(matrix.window_end_ms[cols[:, :context]]).astype(np.float32)  # (B, L, 4)
        assert cal.shape[-1] == CALENDAR_CHANNELS
        x = np.concatenate([x, cal], axis=-1)
    return np.ascontiguousarray(x), np.ascontiguousarray(win[:, context:], dtype=np.float32)


class WindowSamples(Dataset):
    """The samples of one epoch's plan over ``matrix`` (see the module docstring).

    ``resample``: draw a new plan at every :meth:`set_epoch` (training); else the plan of epoch 0 stays
    (validation). The plan is a function of ``(seed, salt, epoch)`` only, so every DDP rank draws the same
    one and Lightning's distributed sampler splits it.
    """

    def __init__(self, matrix: SeriesMatrix, context: int, horizon: int, *, calendar: bool, span: tuple[int, int],
                 budget: int, seed: int, half_life: float | None = None, resample: bool = True, salt: int = 0):
        self.matrix, self.context, self.horizon, self.calendar = matrix, context, horizon, calendar
        self.span, self.budget, self.seed, self.half_life = span, budget, seed, half_life
        self.resample, self.salt = resample, salt
        self._first = first_values(matrix.values)
        self.epoch = -1
        self.series, self.t = self._draw(0)
        self.epoch = 0

    def _draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.salt, epoch])
        return draw_plan(self.matrix, self.context, self.horizon, self.span, self.budget, rng, self.half_life,
                         self._first)

    def set_epoch(self, epoch: int) -> None:
        """Draw the plan of ``epoch`` (same length every epoch)."""
        if self.resample and epoch != self.epoch:
            self.series, self.t = self._draw(epoch)
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.series)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        x, y = gather(self.matrix, self.series[idx], self.t[idx], self.context, self.horizon, self.calendar)
        return torch.from_numpy(x), torch.from_numpy(y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


def training_samples(matrix: SeriesMatrix, config: ModelConfig, train_span: tuple[int, int],
                     val_span: tuple[int, int], train: TrainSettings, seed: int) -> tuple[WindowSamples, WindowSamples]:
    """The training and validation samples of one fit over ``matrix``: targets in ``train_span`` and
    ``val_span``, as every fit draws them (a training cycle; each refit of a backtest).

    Training: ``train.samples_per_epoch`` (series, time) pairs drawn anew each epoch (every valid pair once,
    shuffled, when the span holds no more), weighted by ``train.recency_half_life_windows`` if set.
    Validation: one fixed draw of ``train.validation_samples`` (salt 1, never redrawn). Both seeded by ``seed``
    (``model.seed``)."""
    common: dict[str, Any] = {"calendar": config.calendar, "seed": seed}
    fit_set = WindowSamples(matrix, config.context, config.horizon, span=train_span, budget=train.samples_per_epoch,
                            half_life=train.recency_half_life_windows, **common)
    val_set = WindowSamples(matrix, config.context, config.horizon, span=val_span, budget=train.validation_samples,
                            resample=False, salt=1, **common)
    return fit_set, val_set


def as_batch(batch: Any) -> Any:
    """``collate_fn`` for :class:`WindowSamples`: ``__getitems__`` already returns the batch."""
    return batch
