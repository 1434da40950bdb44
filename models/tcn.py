"""Temporal convolutional network: residual blocks of dilated causal Conv1d (Bai et al., 2018).

Block ``i`` has two causal convolutions of dilation ``2**i``; the number of
blocks is the smallest that makes the receptive field cover the context,
unless ``levels`` fixes it. The head reads the features at the last step.

Only the last step's receptive field is computed: with dilations doubling,
block ``i`` is needed only at the steps ``t = L - 1 (mod 2**i)``, and on that
subsequence its dilated convolution is a plain (dilation 1) one. So block ``i``
runs on every ``2**i``-th step counted back from the last; its first
convolution covers all of them, while its second convolution, residual and
activation are computed only at the steps the next block reads (every other
one; the last block: only the last step), as a stride-2 convolution. The
function, the weights and the saved form are those of the ordinary dilated TCN
read at its last step.

Inference (eval mode, no autograd) computes the same convolutions as matrix
products over rows (:meth:`ResidualBlock.forward_rows`, :func:`conv_rows`): a
block's input is a buffer ``(B, P, C)`` of steps with channels last, each
series' steps after ``pad >= k - 1`` zero rows (the causal padding; ``P``
even), flattened to ``B * P`` rows. A causal convolution is then a few products
of row blocks shifted by a tap (or two adjacent taps) with the taps' ``(C_in,
C_out)`` weights, over all series at once; the stride 2 is a view of every
other row, and outputs that fall in the next series' padding are zeroed or
dropped. For 1,000 series on one CPU thread a forecast takes about 70% of its
time with ``conv1d`` on these short sequences (BENCHMARKS.md); the forecasts are
the convolutions' to float rounding. Training and ONNX export run the
convolutions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from models.base import ForecastModel, ModelConfig
from models.registry import register_model


@dataclass
class TCNConfig(ModelConfig):
    channels_hidden: int = 16
    kernel_size: int = 3
    levels: int | None = None
    weight_norm: bool = False

    def check(self) -> list[str]:
        out = []
        if self.kernel_size < 2:
            out.append(f"kernel_size must be >= 2 (got {self.kernel_size})")
        if self.levels is not None and self.levels < 1:
            out.append(f"levels must be >= 1 or None (got {self.levels})")
        if self.channels_hidden < 1:
            out.append("channels_hidden must be >= 1")
        return out

    @property
    def n_levels(self) -> int:
        """Blocks: ``levels`` or the fewest with ``1 + 2(k-1)(2**n - 1) >= context``."""
        if self.levels is not None:
            return self.levels
        need = (self.context - 1) / (2 * (self.kernel_size - 1)) + 1
        return max(1, math.ceil(math.log2(need)))


def receptive_field(kernel_size: int, levels: int) -> int:
    """Steps one output sees: two convolutions per block, dilation doubling per block."""
    return 1 + 2 * (kernel_size - 1) * (2**levels - 1)


def causal_conv(c_in: int, c_out: int, kernel: int, wn: bool) -> nn.Module:
    """The weights of one causal convolution, weight-normed if asked. :class:`ResidualBlock` applies them with
    the causal padding and the dilation's subsampling (see the module doc), not through ``forward``."""
    conv = nn.Conv1d(c_in, c_out, kernel)
    return weight_norm(conv) if wn else conv


class ResidualBlock(nn.Module):
    """Block ``i`` of the TCN: ``relu(x' + dropout(relu(conv2(dropout(relu(conv1(x)))))))``, both convolutions
    causal with dilation ``2**i`` (here: on the subsampled steps), ``x'`` the input through ``down`` (a 1x1
    convolution where the channels change)."""

    # the saved form's names before the layers were named for their role: weights saved by earlier versions
    # (registered in MLflow) still load, renamed once in ``_load_from_state_dict``
    OLD_NAMES = {"net.0.conv.": "conv1.", "net.3.conv.": "conv2."}

    def __init__(self, c_in: int, c_out: int, kernel: int, dropout: float, wn: bool):
        super().__init__()
        self.conv1 = causal_conv(c_in, c_out, kernel, wn)
        self.conv2 = causal_conv(c_out, c_out, kernel, wn)
        self.dropout = nn.Dropout(dropout)  # after each convolution's ReLU
        self.down = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()  # the residual's channels

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        """``x (B, C, N)`` -> the block's outputs at every other step ending at the last,
        ``(B, c, ceil(N / 2))``, or at the last step only, ``(B, c, 1)``.

        The causal padding is the convolutions' own (zeros on both sides, the outputs that read the
        right side dropped), not a padded copy of each input, and the ReLUs work in place (both faster
        on one CPU thread, same outputs; BENCHMARKS.md, "TCN forward")."""
        n, k = x.shape[-1], self.conv2.kernel_size[0]
        # (B, C, N) -> (B, c, N + k - 1): output j is step j (steps N.. read the right padding; unused)
        h = F.relu_(F.conv1d(x, self.conv1.weight, self.conv1.bias, padding=k - 1))
        if self.training:  # dropout masks drawn for the N steps only
            h = self.dropout(h[:, :, :n])
        w, b = self.conv2.weight, self.conv2.bias
        if last_only:  # step N - 1 only: (B, c, 1)
            start, stride = n - 1, 1
            h = F.conv1d(h[:, :, max(0, n - k):n], w, b, padding=max(0, k - n))[:, :, :1]
        else:  # steps start, start + 2, ..., N - 1: left padding k - 1 - start puts the first at output 0
            start, stride = (n - 1) % 2, 2
            h = F.conv1d(h, w, b, stride=2, padding=k - 1 - start)[:, :, :(n + 1) // 2]
        h, skip = self.dropout(F.relu(h)), self.down(x[:, :, start::stride])
        return F.relu_(h + skip if torch.is_grad_enabled() else h.add_(skip))  # ReLU's backward needs h

    def forward_rows(self, x: Tensor, pad: int) -> tuple[Tensor, int]:
        """:meth:`forward`'s outputs at every other step ending at the last, in eval mode without autograd, on
        a step buffer ``x (B, P, C)`` (see :func:`step_buffer`): the next block's buffer and its padding."""
        b, p, c_in = x.shape
        n, k = p - pad, self.conv2.kernel_size[0]
        rows = x.view(b * p, c_in)
        h = self._conv1_rows(rows, pad, b, p)
        # steps start, start + 2, .., N - 1: output row i reads row r0 + 2i, so series s's outputs are the
        # rows s * P / 2 + [0, ceil(N / 2)) (P is even); the rows between them read a padding: dropped
        r0, n_out = pad + (n - 1) % 2, (n + 1) // 2
        m = (b - 1) * p // 2 + n_out
        out = x.new_empty(b * p // 2, h.shape[1])
        conv_rows(h, self.conv2.weight, self.conv2.bias, r0 - (k - 1), m, 2, out[:m]).relu_()
        skip = rows[r0 : r0 + 2 * m - 1 : 2]
        if isinstance(self.down, nn.Conv1d):  # h + down(x): h + x @ W_down^T + b_down
            out[:m].addmm_(skip, self.down.weight[:, :, 0].T).add_(self.down.bias)
        else:
            out[:m].add_(skip)
        nxt, pad_next = step_buffer(b, n_out, out.shape[1], k, x)
        torch.clamp_min(out.view(b, p // 2, -1)[:, :n_out], 0, out=nxt[:, pad_next:])  # relu, into the buffer
        return nxt, pad_next

    def forward_rows_last(self, x: Tensor, pad: int) -> Tensor:
        """:meth:`forward`'s output at the last step ``(B, c)``, as :meth:`forward_rows` (the last block)."""
        b, p, c_in = x.shape
        k = self.conv2.kernel_size[0]
        h = self._conv1_rows(x.view(b * p, c_in), pad, b, p).view(b, p, -1)
        window = h[:, p - k :].reshape(b, -1)  # (B, k * c): steps N - k .. N - 1 (zero rows before the first)
        taps = self.conv2.weight.permute(2, 1, 0).reshape(window.shape[1], -1)  # (k * c, c): tap-major rows
        out = torch.addmm(self.conv2.bias, window, taps)
        skip = self.down(x[:, -1:].transpose(1, 2))[:, :, 0]  # (B, c): the last step through down
        return out.relu_().add_(skip).relu_()

    def _conv1_rows(self, rows: Tensor, pad: int, b: int, p: int) -> Tensor:
        """``relu(conv1)`` at every row of ``rows (B * P, C)``, the padding rows zero: ``(B * P, c)``."""
        k = self.conv1.kernel_size[0]
        h = rows.new_empty(b * p, self.conv1.out_channels)
        conv_rows(rows, self.conv1.weight, self.conv1.bias, pad - (k - 1), b * p - pad, 1, h[pad:]).relu_()
        h.view(b, p, -1)[:, :pad] = 0  # the causal padding of conv2 (these rows read the previous series)
        return h

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for old, new in self.OLD_NAMES.items():
            for key in [key for key in state_dict if key.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


def step_buffer(b: int, n: int, c: int, k: int, like: Tensor) -> tuple[Tensor, int]:
    """A buffer ``(B, P, C)`` for ``n`` steps of ``b`` series, and ``pad``: each series' first ``pad`` rows
    are zeros (``k - 1`` or ``k``: the causal padding of a kernel of ``k``, with ``P = pad + n`` even), its
    steps follow (not initialised)."""
    pad = k - 1 + (n + k - 1) % 2
    buf = like.new_empty(b, pad + n, c)
    buf[:, :pad] = 0
    return buf, pad


def conv_rows(
    rows: Tensor, weight: Tensor, bias: Tensor, first: int, n: int, stride: int, out: Tensor
) -> Tensor:
    """``out[i] = bias + sum_j rows[first + stride * i + j] @ weight[:, :, j].T`` for ``i < n``: a convolution
    with ``weight (C_out, C_in, k)`` over the contiguous rows ``(R, C_in)`` (steps, channels last), into
    ``out (n, C_out)``.

    One product per group of ``stride`` consecutive taps: their rows are adjacent, so for every output they
    are one run of ``stride * C_in`` values, and the runs of consecutive outputs are a matrix view (no copy).
    With one input channel all ``k`` taps form one group (a copy of the ``(n, k)`` windows, small)."""
    c_out, c_in, k = weight.shape
    taps = weight.permute(2, 1, 0)  # (k, C_in, C_out)
    group = k if c_in == 1 else stride
    for j in range(0, k, group):
        g = min(group, k - j)  # taps j .. j + g - 1
        x = rows.as_strided((n, g * c_in), (stride * c_in, 1), rows.storage_offset() + (first + j) * c_in)
        w = taps[j : j + g].reshape(g * c_in, c_out)
        if j == 0:
            torch.addmm(bias, x, w, out=out)
        else:
            out.addmm_(x, w)
    return out


@register_model("tcn", TCNConfig)
class TCNForecaster(ForecastModel):
    def __init__(self, config: TCNConfig):
        super().__init__(config)
        c, k = config.channels_hidden, config.kernel_size
        self.blocks = nn.Sequential(*[
            ResidualBlock(config.channels if i == 0 else c, c, k, config.dropout, config.weight_norm)
            for i in range(config.n_levels)
        ])
        self._build_head(c)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.config.kernel_size, self.config.n_levels)

    def backbone(self, x: Tensor) -> Tensor:
        """``(B, L, C)`` -> the features at the last step ``(B, c)``."""
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or len(x) == 0:
            return self._backbone_conv(x)  # (an empty batch has no rows to view)
        return self._backbone_rows(x)

    def _backbone_rows(self, x: Tensor) -> Tensor:
        """:meth:`_backbone_conv`'s function as products over rows (see the module doc): inference only."""
        b, length, c = x.shape
        rows, pad = step_buffer(b, length, c, self.config.kernel_size, x)
        rows[:, pad:] = x  # (B, L, C): the steps, channels last
        *blocks, last = self.blocks
        for block in blocks:
            rows, pad = block.forward_rows(rows, pad)  # every other step ending at the last
        return last.forward_rows_last(rows, pad)

    def _backbone_conv(self, x: Tensor) -> Tensor:
        """The blocks' convolutions (:meth:`ResidualBlock.forward`): training and ONNX export."""
        # (B, L, C) -> (B, C, L) with standard strides: a transposed (B, L, 1) has strides that read as
        # channels-last, and the convolutions would keep that layout (other dropout masks in training)
        h = x.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # block i reads every 2**i-th step ending at the last (dilation 2**i) and returns every
            # other one of those for block i + 1; the last block returns only the last step
            h = block(h, last_only=i == last)
        return h[:, :, -1]  # (B, c): the last step sees the whole receptive field
