"""Stacked recurrent encoder (LSTM, GRU or vanilla RNN); the head reads the last hidden state.

With ``patch = p > 1`` the recurrence runs over segments of ``p`` consecutive
steps (SegRNN, Lin et al., 2023): each recurrent step reads one segment's
``p * C`` values, so a context of 96 costs 96 / p sequential steps (``p`` is
capped at the context). Segments
are aligned to the end of the context; up to ``p - 1`` of the oldest steps are
left to the linear highway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from models.base import ForecastModel, ModelConfig
from models.registry import register_model

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass
class LSTMConfig(ModelConfig):
    hidden: int = 64
    layers: int = 1
    cell: str = "lstm"
    patch: int = 8

    legacy: ClassVar[dict[str, Any]] = {"patch": 1}

    def check(self) -> list[str]:
        out = []
        if self.cell not in CELLS:
            out.append(f"cell must be one of {sorted(CELLS)} (got {self.cell!r})")
        if self.hidden < 1 or self.layers < 1:
            out.append("hidden and layers must be >= 1")
        if self.patch < 1:
            out.append(f"patch must be >= 1 (got {self.patch})")
        return out

    @property
    def segment(self) -> int:
        """Steps per recurrent step: ``patch``, at most the context."""
        return min(self.patch, self.context)


@register_model("lstm", LSTMConfig)
class LSTMForecaster(ForecastModel):
    def __init__(self, config: LSTMConfig):
        super().__init__(config)
        self.rnn = CELLS[config.cell](
            config.channels * config.segment, config.hidden, num_layers=config.layers, batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self._build_head(config.hidden)

    def backbone(self, x: Tensor) -> Tensor:
        b, length, c = x.shape
        p = self.config.segment
        n = length // p
        seg = x[:, length - n * p :].reshape(b, n, p * c)  # (B, L, C) -> (B, L / p, p * C)
        out, _ = self.rnn(seg)  # (B, L / p, hidden)
        return out[:, -1]  # (B, hidden)
