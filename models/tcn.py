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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for old, new in self.OLD_NAMES.items():
            for key in [key for key in state_dict if key.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


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
        # (B, L, C) -> (B, C, L) with standard strides: a transposed (B, L, 1) has strides that read as
        # channels-last, and the convolutions would keep that layout (other dropout masks in training)
        h = x.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # block i reads every 2**i-th step ending at the last (dilation 2**i) and returns every
            # other one of those for block i + 1; the last block returns only the last step
            h = block(h, last_only=i == last)
        return h[:, :, -1]  # (B, c): the last step sees the whole receptive field
