"""The inference forms of the HRNN and the TCN (eval mode, no autograd) compute the function of their
``nn`` modules, which training and the ONNX export still run; training still back-propagates."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from models import create_model


def _random_head(model: torch.nn.Module) -> None:
    """Untrained heads are zero (forecast = the base): random ones make the forecast read the backbone."""
    torch.manual_seed(1)
    for layer in (model.head[-1], model.skip):
        torch.nn.init.normal_(layer.weight, 0, 0.1)


def _normalised(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input the backbone sees: the target normalised per sample, as ``forward_normalised`` does."""
    loc, scale = model.scaling(x)
    xn = x.clone()
    xn[..., 0] = (x[..., 0] - loc) / scale
    return xn


def _check_inference_form(model: torch.nn.Module, reference: str, fast: str) -> None:
    """``fast`` (what ``backbone`` runs under no_grad in eval mode) equals ``reference`` (the modules), and so
    do the forecasts; in training mode and with autograd on, the reference runs."""
    model.eval()
    x = torch.randn(9, model.config.context, model.config.channels) * 3 + 10
    with torch.no_grad():
        xn = _normalised(model, x)
        want, got = getattr(model, reference)(xn), getattr(model, fast)(xn)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with mock.patch.object(model, reference, side_effect=AssertionError("the modules ran")):
            fast_forecast = model(x)  # inference takes the fast form
    with torch.enable_grad(), mock.patch.object(model, fast, side_effect=AssertionError("the fast form ran")):
        slow_forecast = model(x)
    torch.testing.assert_close(fast_forecast, slow_forecast.detach(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode(), mock.patch.object(model, reference, side_effect=AssertionError("modules")):
        torch.testing.assert_close(model(x), fast_forecast, rtol=0, atol=0)

    # training: the modules, with dropout, and gradients for every parameter
    model.train()
    with mock.patch.object(model, fast, side_effect=AssertionError("the fast form ran")):
        model.loss(x, torch.randn(9, model.config.horizon) + 10).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


HRNN_CONFIGS = [
    {},  # the default: GRU, hidden 32, 3 levels, k 4, mean pooling, context 96
    {"cell": "lstm"},
    {"cell": "rnn"},
    {"context": 37, "k": 3, "pooling": "max"},  # groups that drop the oldest outputs at each level
    {"context": 50, "levels": 2, "k": 5, "pooling": "last", "hidden": 16},
    {"context": 20, "levels": 1},
    {"context": 37, "k": 3, "cell": "lstm", "pooling": "last", "calendar": True},
    {"context": 30, "cell": "rnn", "pooling": "mean", "calendar": True, "hidden": 8},
]


def _ids(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items()) or "default"


@pytest.mark.parametrize("settings", HRNN_CONFIGS, ids=_ids)
def test_hrnn_inference_equals_its_recurrent_modules(settings: dict) -> None:
    torch.manual_seed(0)
    model = create_model("hrnn", horizon=6, **settings)
    _random_head(model)
    _check_inference_form(model, "_backbone_modules", "_backbone_inference")


def test_hrnn_gru_inference_equals_torch_gru_cells_step_by_step() -> None:
    """The recurrence against ``torch.nn.functional``'s own GRU step, applied naively, level by level."""
    from models.hrnn import recurrence

    torch.manual_seed(0)
    rnn = torch.nn.GRU(3, 16).eval()
    u = torch.randn(11, 5, 3)  # (T, B, C)
    h, outs = torch.zeros(5, 16), []
    for t in range(11):
        h = torch.gru_cell(u[t], h, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        outs.append(h)
    with torch.no_grad():
        got = recurrence(rnn, u.permute(0, 2, 1))  # (T, C, B) -> (T, H, B)
    torch.testing.assert_close(got.permute(0, 2, 1), torch.stack(outs).detach(), rtol=1e-5, atol=1e-6)


TCN_CONFIGS = [
    {},  # the default: kernel 3, 16 channels, 5 blocks for context 96
    {"context": 37},  # odd lengths inside the network
    {"context": 37, "kernel_size": 2},
    {"context": 50, "kernel_size": 4, "channels_hidden": 5},
    {"context": 10, "levels": 4},  # blocks shorter than the kernel
    {"context": 9, "kernel_size": 5, "levels": 1},  # one block: the last
    {"context": 40, "weight_norm": True},
    {"context": 33, "calendar": True, "channels_hidden": 8},  # 5 input channels, a 1x1 down convolution
]


@pytest.mark.parametrize("settings", TCN_CONFIGS, ids=_ids)
def test_tcn_inference_equals_its_convolutions(settings: dict) -> None:
    torch.manual_seed(0)
    model = create_model("tcn", horizon=6, **settings)
    _random_head(model)
    _check_inference_form(model, "_backbone_conv", "_backbone_rows")


def test_tcn_inference_equals_the_full_dilated_tcn_at_its_last_step() -> None:
    """Against the ordinary dilated causal TCN, every step computed (torch ops only), at the default size."""
    model = create_model("tcn", context=96, horizon=4).eval()
    x = torch.randn(6, 96, 1)
    h = x.transpose(1, 2)
    for i, block in enumerate(model.blocks):
        d, k = 2**i, model.config.kernel_size
        out = h
        for conv in (block.conv1, block.conv2):
            out = F.relu(F.conv1d(F.pad(out, ((k - 1) * d, 0)), conv.weight, conv.bias, dilation=d))
        h = F.relu(out + block.down(h))
    with torch.no_grad():
        torch.testing.assert_close(model._backbone_rows(x), h[:, :, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["hrnn", "tcn"])
def test_inference_takes_any_batch_size(name: str) -> None:
    model = create_model(name, context=20, horizon=3, **({"levels": 2} if name == "hrnn" else {})).eval()
    with torch.inference_mode():
        for b in (0, 1, 2):
            assert model(torch.randn(b, 20, 1)).shape == (b, 3, 3)
