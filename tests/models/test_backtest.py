"""Rolling-origin backtests on a tiny synthetic set, and `rollcast backtest` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from models.backtest import origins_for, rolling_origin
from models.data import SeriesMatrix
from pipeline.errors import NotEnoughData
from tests.support import rollcast

HOUR = 3_600_000


def _seasonal(n: int = 400, m: int = 8) -> SeriesMatrix:
    t = np.arange(n)
    values = np.stack([np.sin(2 * np.pi * t / m) + 0.01 * t, 3 + np.cos(2 * np.pi * t / m)])
    return SeriesMatrix(["a", "b"], values, (t + 1) * HOUR, HOUR)


def test_origins_are_h_apart_at_the_end() -> None:
    assert origins_for(100, context=10, horizon=5, n_origins=3).tolist() == [85, 90, 95]
    with pytest.raises(NotEnoughData, match="test window"):
        origins_for(30, context=10, horizon=5, n_origins=4)


def test_seasonal_naive_is_exact_on_a_pure_season() -> None:
    data = _seasonal()
    data = SeriesMatrix(data.series, data.values[1:], data.window_end_ms, data.step_ms)  # only the cosine
    data = SeriesMatrix(["b"], data.values, data.window_end_ms, data.step_ms)
    r = rolling_origin("seasonal_naive", data, n_origins=3, season=8, config={"context": 16, "horizon": 4, "season": 8})
    assert r.forecasts.shape == (1, 3, 4, 3)
    assert r.metrics["mae"] == pytest.approx(0, abs=1e-6)
    np.testing.assert_allclose(r.actuals[0, 0], data.values[0, r.origins[0] : r.origins[0] + 4])


def test_naive_backtest_matches_a_hand_computation() -> None:
    data = _seasonal()
    r = rolling_origin("naive", data, n_origins=2, season=8, config={"context": 16, "horizon": 4})
    expected = np.concatenate([
        np.abs(data.values[:, o : o + 4] - data.values[:, o - 1 : o]).ravel() for o in r.origins
    ]).mean()
    assert r.metrics["mae"] == pytest.approx(expected)
    assert r.metrics["rel_mae_naive"] == pytest.approx(1.0)


def test_trained_model_beats_naive_and_refits() -> None:
    r = rolling_origin("tcn", _seasonal(), n_origins=4, season=8, refit_every=2, max_epochs=2,
                       config={"context": 16, "horizon": 4, "channels_hidden": 8, "season": 8, "base_lag": 8})
    assert len(r.fits) == 2 and all(f.epochs >= 1 for f in r.fits)
    assert r.metrics["rel_mae_naive"] < 1
    assert np.isfinite(list(r.metrics.values())).all()


def test_cli_backtest_on_a_bundled_dataset(tmp_path: Path) -> None:
    out = tmp_path / "bt"
    r = rollcast("backtest", "temperature_hourly.csv", "--last", "400", "--models", "lstm,naive,seasonal_naive",
                 "--context", "48", "--horizon", "12", "--test-windows", "2", "--max-epochs", "1",
                 "--no-progress", "--out", str(out), env={"ROLLCAST_DATA_DIR": str(tmp_path)}, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "seasonal_naive" in r.stdout and "MASE" in r.stdout
    table = pl.read_csv(out / "metrics.csv")
    assert table["model"].to_list() == ["lstm", "naive", "seasonal_naive"]
    assert table.filter(pl.col("model") == "naive")["rel_mae_naive"].item() == pytest.approx(1.0)
    assert all((out / f"forecast_{m}.png").stat().st_size > 1000 for m in table["model"])


def test_cli_backtest_reads_a_window_store_and_reports_errors(tmp_path: Path) -> None:
    store = tmp_path / "history" / "part=0"
    store.mkdir(parents=True)
    t = np.arange(200) * HOUR
    v = 10 + np.sin(2 * np.pi * np.arange(200) / 24)
    frame = pl.DataFrame({"series": ["s"] * 200, "window_start": t, "window_end": t + HOUR, "count": [1] * 200,
                          "first": v, "last": v, "min": v, "max": v, "mean": v, "sum": v})
    frame.write_parquet(store / "a.parquet")
    staged = tmp_path / "history" / "_pending" / "obs-0" / "ckpt"  # an unfinished ingest checkpoint: hidden
    staged.mkdir(parents=True)
    frame.with_columns(pl.col("series") + "-staged").write_parquet(staged / "a.parquet")
    r = rollcast("backtest", str(tmp_path / "history"), "--models", "naive,seasonal_naive", "--context", "48",
                 "--horizon", "24", "--test-windows", "2", "--no-progress", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert pl.read_csv(tmp_path / "o" / "metrics.csv")["mae"].to_list()[1] == pytest.approx(0, abs=1e-5)
    assert "1 series" in r.stdout, r.stdout
    bad = rollcast("backtest", str(tmp_path / "history"), "--models", "nope", "--no-progress")
    assert bad.returncode == 1 and "known models" in bad.stderr and "Traceback" not in bad.stderr
    short = rollcast("backtest", str(tmp_path / "history"), "--models", "naive", "--test-windows", "50",
                     "--no-progress")
    assert short.returncode == 1 and "too few" in short.stderr and "Traceback" not in short.stderr
