"""Stacked recurrent encoder (LSTM, GRU or vanilla RNN); the head reads the last hidden state."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from models.base import ForecastModel, ModelConfig
from models.registry import register_model

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass
class LSTMConfig(ModelConfig):
    hidden: int = 64
    layers: int = 2
    cell: str = "lstm"

    def check(self) -> list[str]:
        out = []
        if self.cell not in CELLS:
            out.append(f"cell must be one of {sorted(CELLS)} (got {self.cell!r})")
        if self.hidden < 1 or self.layers < 1:
            out.append("hidden and layers must be >= 1")
        return out


@register_model("lstm", LSTMConfig)
class LSTMForecaster(ForecastModel):
    def __init__(self, config: LSTMConfig):
        super().__init__(config)
        self.rnn = CELLS[config.cell](
            config.channels, config.hidden, num_layers=config.layers, batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self._build_head(config.hidden)

    def backbone(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (B, L, C) -> (B, L, hidden)
        return out[:, -1]  # (B, hidden)
