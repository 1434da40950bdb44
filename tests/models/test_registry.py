"""One test over the whole registry, plus architecture-specific checks (timm's test_models.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import available_models, config_class, create_model, load_model, predict, save_model
from models.data import Samples
from models.hrnn import pooling_schedule
from models.tcn import receptive_field
from models.train.fit import fit
from pipeline.errors import ModelConfigError, RollcastError

L, H = 32, 6
TINY = {"tcn": {"channels_hidden": 8}, "lstm": {"hidden": 8, "layers": 1}, "hrnn": {"hidden": 8, "levels": 2},
        "pyramid": {"d_model": 8, "heads": 2, "stages": 2}, "seasonal_naive": {"season": 8}}


def _sine_samples(n: int, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 100, size=(n, 1)) + np.arange(L + H)
    series = 5 + 2 * np.sin(2 * np.pi * t / 8) + 0.05 * rng.standard_normal(t.shape)
    return Samples(series[:, :L, None].astype(np.float32), series[:, L:].astype(np.float32))


@pytest.mark.parametrize("name", available_models())
def test_every_model(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(name, context=L, horizon=H, dropout=0.0, **TINY.get(name, {}))
    x = torch.randn(5, L, 1) + 10
    out = model(x)
    assert out.shape == (5, H, 3)
    assert torch.isfinite(out).all()
    assert (out.diff(dim=-1) >= 0).all()  # quantiles never cross

    # saved then loaded gives the same forecasts, through the public predict path
    before = predict(model, x[..., 0].numpy())
    loaded = load_model(save_model(model, tmp_path / name))
    assert (tmp_path / name / "config.json").exists() and (tmp_path / name / "weights.pt").exists()
    np.testing.assert_array_equal(predict(loaded, x[..., 0].numpy()), before)

    if not model.trainable:
        assert list(model.parameters()) == []
        return
    model.train()
    model.loss(x, torch.randn(5, H) + 10).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    # a few epochs on a learnable sine lower the validation loss
    train, val = _sine_samples(512), _sine_samples(128, seed=1)
    fresh = create_model(name, context=L, horizon=H, learning_rate=1e-2, **TINY.get(name, {}))
    with torch.no_grad():
        start = float(fresh.eval().loss(torch.from_numpy(val.x), torch.from_numpy(val.y)))
    result = fit(fresh, train, val, max_epochs=3, batch_size=64, seed=0)
    assert len(result.train_loss) == len(result.val_loss) == result.epochs == 3
    assert min(result.val_loss) < 0.8 * start


def test_registry_errors_are_clear() -> None:
    with pytest.raises(ModelConfigError, match="known models: .*lstm.*tcn") as e:
        create_model("transformer-xl")
    assert isinstance(e.value, RollcastError)
    with pytest.raises(ModelConfigError, match="no setting.*'hiden'"):
        create_model("lstm", hiden=3)
    with pytest.raises(ModelConfigError, match="cell must be one of"):
        create_model("lstm", cell="lstmm")
    with pytest.raises(ModelConfigError, match="quantiles"):
        create_model("tcn", quantiles=[0.9, 0.1])
    with pytest.raises(ModelConfigError, match="optimizer"):
        create_model("tcn", optimizer="lbfgs")


def test_defaults_build_and_all_optimisers_step() -> None:
    for name in available_models():
        assert create_model(name).config.context == 96
    x, y = torch.randn(4, L, 1), torch.randn(4, H)
    for opt in ("adam", "adamw", "sgd", "rmsprop", "adagrad", "adadelta"):
        m = create_model("tcn", context=L, horizon=H, optimizer=opt, weight_decay=1e-4, channels_hidden=4)
        optim = m.configure_optimizers()
        before = [p.detach().clone() for p in m.parameters()]
        m.loss(x, y).backward()
        optim.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True)), opt


def test_training_is_reproducible_with_a_seed() -> None:
    train = _sine_samples(256)
    losses = []
    for _ in range(2):
        m = create_model("lstm", context=L, horizon=H, hidden=8, layers=1)
        losses.append(fit(m, train, None, max_epochs=2, batch_size=64, seed=7).train_loss)
    assert losses[0] == losses[1]


def test_flat_series_and_level_shift_are_handled() -> None:
    m = create_model("tcn", context=L, horizon=H, channels_hidden=4)
    flat = np.full((2, L), 3.0)
    out = predict(m, flat)
    assert np.isfinite(out).all()
    # per-window normalisation: shifting and scaling a context shifts and scales its forecast
    ctx = np.random.default_rng(0).normal(size=(3, L))
    np.testing.assert_allclose(predict(m, 100 + 10 * ctx), 100 + 10 * predict(m, ctx), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("normalise", ["last", "mean"])
def test_scale_is_the_floored_population_std_and_flat_contexts_train(normalise: str) -> None:
    m = create_model("tcn", context=L, horizon=H, channels_hidden=4, normalise=normalise)
    x = torch.from_numpy(np.random.default_rng(1).normal(7, 3, size=(64, L, 1)).astype(np.float32))
    x[0] = 2.5  # a flat context: the scale is eps
    loc, scale = m.scaling(x)
    want = x[..., 0].std(dim=1, keepdim=True, unbiased=False).clamp_min(m.config.eps)
    torch.testing.assert_close(scale, want, rtol=1e-6, atol=0)
    assert scale[0].item() == pytest.approx(m.config.eps)
    # the flat sample's gradient is finite (a root of a zero variance would give NaN)
    x.requires_grad_(True)
    m.loss(x, torch.ones(64, H)).backward()
    assert torch.isfinite(x.grad).all()


def test_tcn_receptive_field() -> None:
    m = create_model("tcn", context=64, kernel_size=3, levels=3, channels_hidden=4, dropout=0.0).eval()
    assert m.receptive_field == receptive_field(3, 3) == 1 + 2 * 2 * (1 + 2 + 4) == 29
    x = torch.randn(1, 64, 1)
    base = m.backbone(x)
    outside, inside = x.clone(), x.clone()
    outside[0, 64 - 29 - 1, 0] += 5.0  # one step beyond the field
    inside[0, 64 - 29, 0] += 5.0  # the oldest step inside it
    assert torch.equal(m.backbone(outside), base)
    assert not torch.allclose(m.backbone(inside), base)
    # automatic depth: the smallest whose field covers the context
    auto = create_model("tcn", context=96, kernel_size=3)
    assert auto.receptive_field >= 96 > receptive_field(3, auto.config.n_levels - 1)


def test_hrnn_pooling_schedule() -> None:
    assert pooling_schedule(16, 3, 2) == [
        [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14), (14, 16)],
        [(0, 2), (2, 4), (4, 6), (6, 8)],
    ]
    m = create_model("hrnn", context=10, levels=3, k=3, pooling="max", hidden=4)
    assert m.schedule == [[(1, 4), (4, 7), (7, 10)], [(0, 3)]]
    h = torch.arange(10.0).view(1, 10, 1)
    assert m._pool(h).flatten().tolist() == [3.0, 6.0, 9.0]  # max of steps 1-3, 4-6, 7-9
    with pytest.raises(ModelConfigError, match="shorter than"):
        create_model("hrnn", context=8, levels=3, k=4)


@pytest.mark.parametrize(("context", "kernel", "levels"), [(40, 3, None), (37, 3, None), (37, 2, None),
                                                       (50, 4, None), (10, 3, 4)])
def test_tcn_last_step_equals_full_dilated_tcn(context: int, kernel: int, levels: int | None) -> None:
    """The subsampled TCN equals an ordinary dilated causal TCN (built here from torch ops) at its last step,
    for even and odd lengths inside it and blocks shorter than the kernel, with and without autograd."""
    import torch.nn.functional as F

    model = create_model("tcn", context=context, horizon=4, channels_hidden=5, kernel_size=kernel,
                         levels=levels, dropout=0.0).eval()
    x = torch.randn(3, context, 1)
    h = x.transpose(1, 2)
    for i, block in enumerate(model.blocks):
        d = 2**i
        out = h
        for conv in (block.conv1, block.conv2):
            out = F.relu(F.conv1d(F.pad(out, ((kernel - 1) * d, 0)), conv.weight, conv.bias, dilation=d))
        h = F.relu(out + block.down(h))
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), h[:, :, -1])
    torch.testing.assert_close(model.backbone(x), h[:, :, -1])  # the autograd path (no in-place add)


def test_models_saved_before_a_field_existed_load_with_its_old_value(tmp_path: Path) -> None:
    import json

    old = create_model("lstm", context=L, horizon=H, hidden=8, layers=1, patch=1)
    save_model(old, tmp_path / "old")
    spec = json.loads((tmp_path / "old" / "config.json").read_text())
    del spec["config"]["patch"]  # as written before segments existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(spec))
    loaded = load_model(tmp_path / "old")
    assert loaded.config.patch == 1
    x = np.random.default_rng(0).normal(size=(2, L))
    np.testing.assert_array_equal(predict(loaded, x), predict(old, x))


@pytest.mark.parametrize("saved", ["tcn_6ba650c", "tcn_6ba650c_wn"])
def test_tcns_saved_by_earlier_versions_load_and_forecast_the_same(saved: str) -> None:
    """Saved at 6ba650c: the layers were ``blocks.i.net.0.conv`` / ``net.3.conv`` (tests/models/fixtures)."""
    directory = Path(__file__).parent / "fixtures" / saved
    keys = torch.load(directory / "weights.pt", weights_only=True).keys()
    assert any(".net.0.conv." in k for k in keys) and not any(".conv1." in k for k in keys)  # the old layout
    model = load_model(directory)
    assert not any(".net." in k for k in model.state_dict())
    assert model.config.base_lag == 4  # saved as "season": 4, the residual base's old name
    saved_forecast = np.load(directory / "forecast.npz")
    # the same up to float32 rounding: the saved forecast was computed on another CPU, whose kernels
    # (AVX2 vs AVX-512, oneDNN's choice) may round the last bit differently; a wrongly mapped weight
    # moves the forecast by whole units
    np.testing.assert_allclose(predict(model, saved_forecast["context"]), saved_forecast["forecast"],
                               rtol=1e-5, atol=1e-5)
    # its weights under today's names load into a new model the same way: bit for bit on this CPU (the saved
    # forecast came from another CPU, so it is the loaded model this one must equal exactly)
    rebuilt = create_model("tcn", **model.config.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(predict(rebuilt, saved_forecast["context"]),
                                  predict(model, saved_forecast["context"]))


def test_every_model_takes_the_same_settings() -> None:
    """``season`` is the series' season m for every model, ``base_lag`` the base a trained model forecasts the
    residual over: one set of settings builds any model, and no caller branches on the name."""
    x = torch.randn(4, L, 1) + 10
    settings = {"context": L, "horizon": H, "season": 8, "base_lag": 8}
    seasonal = create_model("seasonal_naive", **settings)
    assert seasonal.lag == 8
    for name in available_models():
        model = create_model(name, **{**settings, **TINY.get(name, {})}).eval()
        assert (model.config.season, model.config.base_lag) == (8, 8)
        if model.trainable:  # untrained, a model forecasts its base: here seasonal naive of lag 8
            torch.testing.assert_close(model(x)[..., 1], seasonal(x)[..., 1])
    with pytest.raises(ModelConfigError, match="base_lag must be in"):
        create_model("tcn", context=L, base_lag=L)
    # the baselines are their own base: a base_lag they cannot use does not stop them
    assert create_model("naive", context=L, season=L + 8, base_lag=L + 8).config.base_lag == L + 8


def test_configs_saved_when_season_was_the_residual_base_load_with_base_lag(tmp_path: Path) -> None:
    import json

    old = create_model("lstm", context=L, horizon=H, hidden=8, layers=1, season=8, base_lag=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in old.parameters():
            p.normal_(0, 0.3)
    save_model(old, tmp_path / "old")
    spec = json.loads((tmp_path / "old" / "config.json").read_text())
    del spec["config"]["base_lag"]  # as written when "season" named the residual base
    (tmp_path / "old" / "config.json").write_text(json.dumps(spec))
    loaded = load_model(tmp_path / "old")
    assert (loaded.config.season, loaded.config.base_lag) == (8, 8)
    x = np.random.default_rng(0).normal(size=(2, L))
    np.testing.assert_array_equal(predict(loaded, x), predict(old, x))
    # a baseline's season was always its lag, and saved today, both fields come back as they were
    assert "base_lag" not in config_class("seasonal_naive").upgrade({"season": 24})
    assert config_class("tcn").upgrade({"season": 24, "base_lag": 0})["base_lag"] == 0
