"""Hierarchical RNN: level 0 runs at full resolution, level ``j`` every ``k**j`` steps.

Level ``j > 0`` reads a pooling (max, mean or last) of ``k`` consecutive
outputs of level ``j - 1``; groups are aligned to the end of the context, so
the most recent steps always form a complete group and up to ``k - 1`` of the
oldest outputs are dropped. The head sees the final states of all levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.base import ForecastModel, ModelConfig
from models.registry import register_model

POOLS = ("max", "mean", "last")


@dataclass
class HRNNConfig(ModelConfig):
    hidden: int = 32
    levels: int = 3
    k: int = 4
    pooling: str = "mean"
    cell: str = "gru"

    def check(self) -> list[str]:
        out = []
        if self.pooling not in POOLS:
            out.append(f"pooling must be one of {POOLS} (got {self.pooling!r})")
        if self.cell not in ("gru", "lstm", "rnn"):
            out.append(f"cell must be gru, lstm or rnn (got {self.cell!r})")
        if self.levels < 1 or self.k < 2 or self.hidden < 1:
            out.append("levels >= 1, k >= 2 and hidden >= 1 are required")
        elif self.context < self.k ** (self.levels - 1):
            out.append(f"context {self.context} is shorter than k**(levels-1) = {self.k ** (self.levels - 1)}")
        return out


def pooling_schedule(context: int, levels: int, k: int) -> list[list[tuple[int, int]]]:
    """For each level ``j >= 1``, the ``[start, end)`` ranges of level ``j-1`` steps pooled per step.

    >>> pooling_schedule(10, 3, 3)
    [[(1, 4), (4, 7), (7, 10)], [(0, 3)]]
    """
    out = []
    length = context
    for _ in range(1, levels):
        n = length // k
        start = length - n * k
        out.append([(start + i * k, start + (i + 1) * k) for i in range(n)])
        length = n
    return out


@register_model("hrnn", HRNNConfig)
class HRNNForecaster(ForecastModel):
    def __init__(self, config: HRNNConfig):
        super().__init__(config)
        cell = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[config.cell]
        h = config.hidden
        self.rnns = nn.ModuleList(
            [cell(config.channels if j == 0 else h, h, batch_first=True) for j in range(config.levels)]
        )
        self._build_head(h * config.levels)

    @property
    def schedule(self) -> list[list[tuple[int, int]]]:
        """The pooling schedule for this model's context (see :func:`pooling_schedule`)."""
        return pooling_schedule(self.config.context, self.config.levels, self.config.k)

    def _pool(self, h: Tensor) -> Tensor:
        b, length, d = h.shape
        k = self.config.k
        n = length // k
        groups = h[:, length - n * k :].reshape(b, n, k, d)  # (B, n*k, D) -> (B, n, k, D)
        if self.config.pooling == "max":
            return groups.amax(dim=2)
        if self.config.pooling == "mean":
            return groups.mean(dim=2)
        return groups[:, :, -1]

    def backbone(self, x: Tensor) -> Tensor:
        finals = []
        seq = x  # (B, L, C)
        for j, rnn in enumerate(self.rnns):
            if j > 0:
                seq = self._pool(seq)  # (B, n, D) -> (B, n // k, D)
            seq, _ = rnn(seq)  # (B, n, D)
            finals.append(seq[:, -1])
        return torch.cat(finals, dim=-1)  # (B, levels * D)
