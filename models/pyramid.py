"""Pyramidal transformer: attention blocks at full resolution, then on sequences pooled per stage.

The context is cut into tokens of ``patch`` consecutive steps (PatchTST-style,
aligned to the end; up to ``patch - 1`` of the oldest steps are left to the
linear highway). Stage 0 attends over all tokens; each later stage first
average-pools the sequence by ``factor`` (aligned to the end of the context)
and attends over the shorter sequence. The head reads the mean and the last
token of the final stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.base import ForecastModel, ModelConfig
from models.registry import register_model


@dataclass
class PyramidConfig(ModelConfig):
    d_model: int = 32
    heads: int = 4
    stages: int = 3
    factor: int = 2
    blocks_per_stage: int = 1
    patch: int = 4

    legacy: ClassVar[dict[str, Any]] = {"patch": 1}

    @property
    def tokens(self) -> int:
        return self.context // self.patch

    def check(self) -> list[str]:
        out = []
        if not 1 <= self.patch <= self.context:
            out.append(f"patch must be in [1, context] (got {self.patch})")
            return out
        if self.d_model < 1 or self.heads < 1 or self.d_model % self.heads:
            out.append(f"d_model ({self.d_model}) must be a positive multiple of heads ({self.heads})")
        if self.stages < 1 or self.factor < 2 or self.blocks_per_stage < 1:
            out.append("stages >= 1, factor >= 2 and blocks_per_stage >= 1 are required")
        elif self.tokens < self.factor ** (self.stages - 1):
            out.append(f"context {self.context} / patch {self.patch} gives fewer tokens than factor**(stages-1)")
        return out


@register_model("pyramid", PyramidConfig)
class PyramidForecaster(ForecastModel):
    def __init__(self, config: PyramidConfig):
        super().__init__(config)
        d = config.d_model
        self.embed = nn.Linear(config.channels * config.patch, d)
        self.pos = nn.Parameter(torch.randn(config.tokens, d) * 0.02)
        self.stages = nn.ModuleList([
            nn.Sequential(*[
                nn.TransformerEncoderLayer(d, config.heads, dim_feedforward=2 * d, dropout=config.dropout,
                                           batch_first=True, norm_first=True)
                for _ in range(config.blocks_per_stage)
            ])
            for _ in range(config.stages)
        ])
        self.norm = nn.LayerNorm(d)
        self._build_head(2 * d)

    def _pool(self, h: Tensor) -> Tensor:
        b, length, d = h.shape
        f = self.config.factor
        n = length // f
        return h[:, length - n * f :].reshape(b, n, f, d).mean(dim=2)  # (B, n*f, d) -> (B, n, d)

    def backbone(self, x: Tensor) -> Tensor:
        b, length, c = x.shape
        p, n = self.config.patch, self.config.tokens
        tokens = x[:, length - n * p :].reshape(b, n, p * c)  # (B, L, C) -> (B, L / p, p * C)
        h = self.embed(tokens) + self.pos  # (B, L / p, d)
        for i, stage in enumerate(self.stages):
            if i > 0:
                h = self._pool(h)
            h = stage(h)
        h = self.norm(h)
        return torch.cat([h.mean(dim=1), h[:, -1]], dim=-1)  # (B, 2d)
