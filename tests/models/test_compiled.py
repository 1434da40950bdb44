"""Compiled inference (models/compiled.py): over the whole registry, the ONNX graph a saved model carries
forecasts what the module does, through the same gap rule and calendar features; a model without a
usable graph serves in eager PyTorch, and the session runs on the threads it is given."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.compiled import ATOL, EAGER, ONNX_FILE, ONNXRUNTIME, RTOL, OnnxModel
from models.serving.forecaster import load_saved_model

L, H = 32, 6
HOUR = 3_600_000
TINY = {"tcn": {"channels_hidden": 8}, "lstm": {"hidden": 8, "layers": 1}, "hrnn": {"hidden": 8, "levels": 2},
        "pyramid": {"d_model": 8, "heads": 2, "stages": 2}, "seasonal_naive": {"season": 8}}
BASELINES = {"naive", "seasonal_naive"}  # torch.quantile, which the TorchScript exporter lacks


def perturbed(name: str, **config) -> models.ForecastModel:
    """A model whose network matters: an untrained one forecasts exactly its base (the head starts at 0)."""
    model = models.create_model(name, **{"context": L, "horizon": H, **TINY.get(name, {}), **config})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def contexts(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` contexts ``(n, L)`` with gaps (NaN: inside, leading, and one row all gaps) and their window
    ends ``(n, L)``, each row ending at another hour of the week."""
    rng = np.random.default_rng(seed)
    values = 50 + rng.standard_normal((n, L)).cumsum(axis=1)
    values[rng.random((n, L)) < 0.1] = np.nan
    values[0, :5] = np.nan
    if n > 2:
        values[2] = np.nan  # no known value: not forecast on either path
    ends = 1_700_000_000_000 + HOUR * (rng.integers(0, 24 * 7, size=(n, 1)) + np.arange(L))
    return values, ends


@pytest.mark.parametrize("calendar", [False, True], ids=["plain", "calendar"])
@pytest.mark.parametrize("name", models.available_models())
def test_the_compiled_model_forecasts_what_the_module_does(name: str, calendar: bool, tmp_path: Path) -> None:
    model = perturbed(name, calendar=calendar)
    loaded = load_saved_model(models.save_model(model, tmp_path / name), "1")
    if name in BASELINES:  # no graph: served by the module
        assert not (tmp_path / name / ONNX_FILE).exists()
        assert loaded.compiled is None and loaded.runtime == EAGER and loaded.runner is loaded.module
        return
    assert loaded.runtime == ONNXRUNTIME and loaded.runner is loaded.compiled
    for n in (1, 3, 1000):  # the batch size is free
        ctx, ends = contexts(n, seed=n)
        eager = models.predict(model, ctx, window_end_ms=ends)
        compiled = models.predict(loaded.runner, ctx, window_end_ms=ends)
        assert compiled.shape == (n, H, 3) and compiled.dtype == np.float32
        np.testing.assert_allclose(compiled, eager, rtol=RTOL, atol=ATOL)  # NaN (row 2) where eager has NaN
        if n > 2:
            assert np.isnan(compiled[2]).all() and not np.isnan(np.delete(compiled, 2, axis=0)).any()
    last = ctx[:, -1]  # the untrained model's median: the last value; the network moves it
    assert not np.allclose(eager[~np.isnan(last), :, 1], last[~np.isnan(last), None], atol=1e-3)
    # the same batches in chunks, as predict's batch_size cuts them
    np.testing.assert_array_equal(models.predict(loaded.runner, ctx, window_end_ms=ends, batch_size=7), compiled)


def test_saving_leaves_the_module_as_it_was_and_says_nothing_on_the_console(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    for name in ("lstm", "naive"):
        model = perturbed(name).train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models.save_model(model, tmp_path / name)
        assert caught == []  # the exporter's TracerWarnings and deprecation notice stay inside
        assert model.training and all(p.requires_grad for p in model.parameters())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert (tmp_path / "lstm" / ONNX_FILE).is_file() and not (tmp_path / "naive" / ONNX_FILE).exists()
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # a failed export prints its graph: naive's is not attempted
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "no ONNX graph for naive (the exporter lacks aten::quantile): it will serve in eager PyTorch"]
    # saving again without the graph removes the old one: it never sits beside other weights
    models.save_model(perturbed("lstm"), tmp_path / "lstm", compiled=False)
    assert not (tmp_path / "lstm" / ONNX_FILE).exists()


def test_a_missing_broken_or_mismatched_graph_falls_back_to_eager(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def runtime(directory: Path) -> str:
        caplog.clear()
        loaded = load_saved_model(directory, "1")
        assert (loaded.compiled is None) == (loaded.runtime == EAGER)
        return loaded.runtime

    def warned() -> str:
        return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)

    good = models.save_model(perturbed("tcn"), tmp_path / "good")
    assert runtime(good) == ONNXRUNTIME and warned() == ""
    assert load_saved_model(good, "1", compiled=False).runtime == EAGER  # asked for

    missing = models.save_model(perturbed("tcn"), tmp_path / "missing", compiled=False)
    assert runtime(missing) == EAGER and warned() == ""  # nothing to warn of: it never had one

    broken = models.save_model(perturbed("tcn"), tmp_path / "broken", compiled=False)
    (broken / ONNX_FILE).write_bytes(b"not a graph")
    assert runtime(broken) == EAGER and "not using" in warned() and "serves in eager PyTorch" in warned()

    other_weights = models.save_model(perturbed("tcn", seed=5), tmp_path / "other_weights", compiled=False)
    shutil.copy(good / ONNX_FILE, other_weights / ONNX_FILE)
    assert runtime(other_weights) == EAGER and "differ from the module's" in warned()

    other_context = models.save_model(perturbed("tcn", context=L + 8), tmp_path / "other_context", compiled=False)
    shutil.copy(good / ONNX_FILE, other_context / ONNX_FILE)
    assert runtime(other_context) == EAGER and f"the config gives ['batch', {L + 8}, 1]" in warned()

    other_horizon = models.save_model(perturbed("tcn", horizon=H + 1), tmp_path / "other_horizon", compiled=False)
    shutil.copy(good / ONNX_FILE, other_horizon / ONNX_FILE)
    assert runtime(other_horizon) == EAGER and f"the config gives ({H + 1}, 3)" in warned()


def test_the_session_runs_sequentially_on_the_inference_threads(tmp_path: Path) -> None:
    import onnxruntime as ort

    directory = models.save_model(perturbed("tcn"), tmp_path / "tcn")
    for threads in (1, 3):
        options = load_saved_model(directory, "1", threads=threads).compiled.session.get_session_options()
        assert options.intra_op_num_threads == threads and options.inter_op_num_threads == 1
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    before = torch.get_num_threads()
    try:  # unset: torch's setting, which the forecast job sets from forecast.inference_threads
        torch.set_num_threads(2)
        assert load_saved_model(directory, "1").compiled.threads == 2
    finally:
        torch.set_num_threads(before)


def test_the_compiled_model_is_an_ordinary_predict_argument() -> None:
    """``OnnxModel`` runs model inputs ``(B, L, C)``, as the module's forward; predict gives it the same
    preprocessing (here calendar features from window ends)."""
    import io

    model = perturbed("lstm", calendar=True).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, L, 5),), buffer, dynamo=False, input_names=["x"],
                          output_names=["q"], dynamic_axes={"x": {0: "batch"}, "q": {0: "batch"}})
    compiled = OnnxModel(buffer.getvalue(), model.config, threads=1)
    assert compiled.mismatch(model) is None
    ctx, ends = contexts(4)
    x = models.make_inputs(np.nan_to_num(ctx, nan=50.0), ends, model.config)
    with torch.inference_mode():
        np.testing.assert_allclose(compiled.run(x), model(torch.from_numpy(x)).numpy(), rtol=RTOL, atol=ATOL)
    with pytest.raises(Exception, match="calendar"):
        models.predict(compiled, ctx)  # the window ends are needed, as for the module
