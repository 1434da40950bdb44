"""Hierarchical RNN: level 0 runs at full resolution, level ``j`` every ``k**j`` steps.

Level ``j > 0`` reads a pooling (max, mean or last) of ``k`` consecutive
outputs of level ``j - 1``; groups are aligned to the end of the context, so
the most recent steps always form a complete group and up to ``k - 1`` of the
oldest outputs are dropped. The head sees the final states of all levels.

Inference (eval mode, no autograd) computes the same recurrences in
:func:`recurrence` instead of the ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` modules:
one matrix product per step for all gates' input and hidden parts and biases,
and a handful of in-place elementwise ops: about 55-60% of the modules' time
for 1,000 series on one thread (BENCHMARKS.md). The forecasts are the modules'
to float rounding; training and ONNX export run the modules.
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

    def _pool(self, h: Tensor, dim: int = 1) -> Tensor:
        """Pool groups of ``k`` steps along ``dim`` (time), aligned to the end: ``n`` steps -> ``n // k``."""
        k, shape = self.config.k, h.shape  # sizes from h.shape: the batch stays symbolic when traced for ONNX
        n = shape[dim] // k
        groups = h.narrow(dim, shape[dim] - n * k, n * k)
        groups = groups.reshape(*shape[:dim], n, k, *shape[dim + 1 :])  # (.., n * k, ..) -> (.., n, k, ..)
        if self.config.pooling == "max":
            return groups.amax(dim=dim + 1)
        if self.config.pooling == "mean":
            return groups.mean(dim=dim + 1)
        return groups.select(dim + 1, k - 1)

    def backbone(self, x: Tensor) -> Tensor:
        """``(B, L, C)`` -> the final states of all levels ``(B, levels * D)``."""
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing():
            return self._backbone_modules(x)
        return self._backbone_inference(x)

    def _backbone_modules(self, x: Tensor) -> Tensor:
        """The recurrences through the ``nn`` modules: training (dropout, autograd) and ONNX export."""
        finals = []
        seq = x  # (B, L, C)
        for j, rnn in enumerate(self.rnns):
            if j > 0:
                seq = self._pool(seq)  # (B, n, D) -> (B, n // k, D)
            seq, _ = rnn(seq)  # (B, n, D)
            finals.append(seq[:, -1])
        return torch.cat(finals, dim=-1)  # (B, levels * D)

    def _backbone_inference(self, x: Tensor) -> Tensor:
        """:meth:`_backbone_modules`' function, feature-major, without autograd (see :func:`recurrence`)."""
        finals = []
        seq = x.permute(1, 2, 0)  # (B, L, C) -> (L, C, B)
        for j, rnn in enumerate(self.rnns):
            if j > 0:
                seq = self._pool(seq, dim=0)  # (n, D, B) -> (n // k, D, B)
            seq = recurrence(rnn, seq)  # (n, D, B)
            finals.append(seq[-1])
        return torch.cat(finals).T  # (levels * D, B) -> (B, levels * D)


def recurrence(rnn: nn.RNNBase, u: Tensor) -> Tensor:
    """The outputs ``(T, H, B)`` of the one-layer ``rnn`` (GRU, LSTM or tanh RNN) over inputs
    ``u (T, C, B)`` from a zero state: its forward in eval mode, without autograd.

    Feature-major: a step's states are the columns of an ``(H, B)`` matrix and its gates are row blocks.
    Step ``t`` is one product ``W @ z[t]``, ``z[t] = [h_{t-1}; u_t; 1]`` in a buffer ``(T + 1, H + C + 1, B)``
    and ``W`` the module's hidden and input weights and summed biases side by side, so no input projection of
    its own (at level 0, with one channel, that would be an outer product per step); the step writes ``h_t``
    into ``z[t + 1]``. The GRU's rows keep ``W_hn h + b_hn`` and ``W_in u + b_in`` apart (zeros where the
    other part's weights would be), since its reset gate scales only the first.
    """
    steps, c, b = u.shape
    h = rnn.hidden_size
    w_ih, w_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    z = u.new_empty(steps + 1, h + c + 1, b)
    z[0, :h] = 0
    z[:steps, h : h + c] = u
    z[:, -1] = 1
    if isinstance(rnn, nn.GRU):  # rows: r and z (input + hidden), W_hn h + b_hn, W_in u + b_in
        w = u.new_zeros(4 * h, h + c + 1)
        w[: 2 * h, :h], w[2 * h : 3 * h, :h] = w_hh[: 2 * h], w_hh[2 * h :]
        w[: 2 * h, h:-1], w[3 * h :, h:-1] = w_ih[: 2 * h], w_ih[2 * h :]
        w[: 2 * h, -1] = b_ih[: 2 * h] + b_hh[: 2 * h]
        w[2 * h : 3 * h, -1], w[3 * h :, -1] = b_hh[2 * h :], b_ih[2 * h :]
        # n = tanh(a) as 2 sigmoid(2a) - 1: the same function, and torch's sigmoid is 3-4x faster per element
        # than its tanh on a CPU; the doubled rows give 2a (doubling is exact); the error is rounding (~1e-7)
        w[2 * h :] *= 2
        s = u.new_empty(4 * h, b)
        for t in range(steps):
            torch.mm(w, z[t], out=s)
            rz = s[: 2 * h].sigmoid_()
            a2 = s[3 * h :].addcmul_(rz[:h], s[2 * h : 3 * h])  # 2a = 2 (W_in u + b_in + r * (W_hn h + b_hn))
            n = a2.sigmoid_().mul_(2).sub_(1)
            torch.lerp(n, z[t, :h], rz[h:], out=z[t + 1, :h])  # (1 - z) * n + z * h
    elif isinstance(rnn, nn.LSTM):  # rows reordered i, f, o, g: the sigmoid gates first
        order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
        w = torch.cat([w_hh, w_ih, (b_ih + b_hh)[:, None]], dim=1)[order]
        s, cell, tanh_cell = u.new_empty(4 * h, b), u.new_zeros(h, b), u.new_empty(h, b)
        for t in range(steps):
            torch.mm(w, z[t], out=s)
            ifo, g = s[: 3 * h].sigmoid_(), s[3 * h :].tanh_()
            cell.mul_(ifo[h : 2 * h]).addcmul_(ifo[:h], g)  # f * c + i * g
            torch.mul(ifo[2 * h :], torch.tanh(cell, out=tanh_cell), out=z[t + 1, :h])  # o * tanh(c)
    else:  # nn.RNN with its default tanh
        w = torch.cat([w_hh, w_ih, (b_ih + b_hh)[:, None]], dim=1)
        for t in range(steps):
            torch.mm(w, z[t], out=z[t + 1, :h]).tanh_()
    return z[1:, :h]
