"""Rolling-origin backtests on a tiny synthetic set, their online calibration (against the live scorer and a
hand-written reference), and `rollcast backtest` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

import models.train.backtest as B
from models import metrics as M
from models.data import SeriesMatrix, windows_to_matrix
from models.io import predict
from models.plots import plot_backtest, plotted_origins
from models.registry import create_model
from models.scoring.calibration import calibrate
from models.scoring.scorer import ModelRef, Scorer
from models.train.backtest import (
    baseline,
    calibrate_sequentially,
    evaluate,
    forecast_at,
    origins_for,
    rolling_origin,
)
from models.train.fit import FitResult
from pipeline.config import load_settings
from pipeline.errors import NotEnoughData
from tests.models.scoring.test_calibration import ReferenceCell
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


def test_origins_every_k_steps_end_h_steps_before_the_end() -> None:
    assert origins_for(100, context=10, horizon=5, n_origins=3, every=5).tolist() == [85, 90, 95]  # the default
    assert origins_for(100, context=10, horizon=5, n_origins=3, every=1).tolist() == [93, 94, 95]
    assert origins_for(100, context=10, horizon=5, n_origins=3, every=7).tolist() == [81, 88, 95]
    assert origins_for(100, context=10, horizon=5, n_origins=81, every=1)[0] == 15  # context + horizon: the least
    with pytest.raises(NotEnoughData, match="test window"):
        origins_for(100, context=10, horizon=5, n_origins=82, every=1)
    with pytest.raises(ValueError, match="at least 1 step"):
        origins_for(100, context=10, horizon=5, n_origins=3, every=0)


def test_default_spacing_is_h_and_counts_every_origin() -> None:
    data = _seasonal()
    kw = {"n_origins": 5, "season": 8, "config": {"context": 16, "horizon": 4}, "calibration": _calibration()}
    default = rolling_origin("naive", data, **kw)
    spaced = rolling_origin("naive", data, origin_every=4, burn_in=0, **kw)
    assert default.origins.tolist() == [380, 384, 388, 392, 396] == spaced.origins.tolist()
    assert default.burn_in == 0 and default.metrics == spaced.metrics
    np.testing.assert_array_equal(default.calibrated, spaced.calibrated)
    fc, cal = default.forecasts, default.calibrated
    assert default.metrics["coverage"] == M.coverage(default.actuals, fc[..., 0], fc[..., -1])
    assert default.metrics["calibrated_coverage"] == M.coverage(default.actuals, cal[..., 0], cal[..., -1])


def test_forecasts_at_many_origins_are_each_origins_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """forecast_at puts many origins' contexts in one predict call, in pieces of FORECAST_ROWS rows: each
    origin's forecasts are still those of a predict call on its own context (gaps and calendar included)."""
    data = _noise(S=3, T=120)
    known = np.ones_like(data.values, dtype=bool)
    known[1, 60:64] = False  # a gap inside some contexts
    data = SeriesMatrix(data.series, data.values, data.window_end_ms, data.step_ms, known)
    model = create_model("tcn", context=16, horizon=4, channels_hidden=8, calendar=True)
    origins = origins_for(120, 16, 4, 30, every=1)
    monkeypatch.setattr(B, "FORECAST_ROWS", 7)  # 2 origins (6 contexts) a call: 15 calls
    ours = forecast_at(model, data, origins)
    alone = np.stack([predict(model, data.contexts(o - 16, o), data.window_end_ms[o - 16 : o]) for o in origins],
                     axis=1)
    assert ours.shape == (3, 30, 4, 3)
    np.testing.assert_allclose(ours, alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours[:, 1:], ours[:, :-1])  # the origins differ: a mix-up would show


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


def test_a_refit_draws_its_samples_as_a_training_cycle_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fit of a backtest gets the training cycle's samples for the same spans (the train.* settings:
    samples_per_epoch pairs anew each epoch, a fixed validation draw of validation_samples from the last
    validation_fraction of the data before the origin, seeded by the seed given), not every sample cut once."""
    from types import SimpleNamespace

    from models import tracking
    from models.data import time_split
    from models.train.cycle import Plan, training_sets

    env = {"ROLLCAST_TRAIN__SAMPLES_PER_EPOCH": "300", "ROLLCAST_TRAIN__VALIDATION_SAMPLES": "40",
           "ROLLCAST_TRAIN__VALIDATION_FRACTION": "0.2", "ROLLCAST_MODEL__SEED": "5"}
    settings = load_settings(env=env)
    seen: list[tuple] = []
    monkeypatch.setattr(B, "fit", lambda model, train, val, **kw: seen.append((model, train, val, kw))
                        or FitResult(epochs=1))
    data = _seasonal(1000)
    config = {"context": 16, "horizon": 4, "channels_hidden": 8, "calendar": True}
    r = rolling_origin("tcn", data, n_origins=6, season=8, refit_every=3, config=config, seed=5, max_epochs=3,
                       batch_size=64, train=settings.train)
    assert len(seen) == 2 and len(r.fits) == 2
    for (model, train, val, kw), origin in zip(seen, r.origins[[0, 3]], strict=True):
        split = time_split(int(origin), 16, 4, 0.2)
        live_train, live_val = training_sets(settings, SimpleNamespace(
            matrix=data, train_span=split.train, val_span=split.val), model.config, Plan(tracking.CYCLE_FULL))
        assert len(train) == 300 and len(val) == 40  # the budgets, not every sample of the span
        for ours, live in ((train, live_train), (val, live_val)):
            assert (ours.span, ours.budget, ours.seed, ours.calendar) == (live.span, live.budget, 5, True)
            np.testing.assert_array_equal(ours.series, live.series)
            np.testing.assert_array_equal(ours.t, live.t)
            ours.set_epoch(2)
            live.set_epoch(2)
            np.testing.assert_array_equal(ours.t, live.t)  # the training draw changes per epoch, alike
        assert kw == {"max_epochs": 3, "batch_size": 64, "seed": 5, "patience": 5}
    default = rolling_origin("tcn", data, n_origins=2, season=8, config=config)  # train.* defaults
    assert len(seen) == 3 and seen[-1][1].budget == 16384 and seen[-1][2].budget == 8192
    assert len(default.fits) == 1


def test_cli_backtest_on_a_bundled_dataset(tmp_path: Path) -> None:
    out = tmp_path / "bt"
    r = rollcast("backtest", "temperature_hourly.csv", "--last", "400", "--models", "lstm,naive,seasonal_naive",
                 "--context", "48", "--horizon", "12", "--test-windows", "2", "--max-epochs", "1",
                 "--no-progress", "--out", str(out), env={"ROLLCAST_DATA_DIR": str(tmp_path)}, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "seasonal_naive" in r.stdout and "MASE" in r.stdout
    assert "calibrated coverage" in r.stdout and "guard 0.05" in r.stdout and "split-conformal" in r.stdout, r.stdout
    table = pl.read_csv(out / "metrics.csv")
    assert table["model"].to_list() == ["lstm", "naive", "seasonal_naive"]
    assert table.filter(pl.col("model") == "naive")["rel_mae_naive"].item() == pytest.approx(1.0)
    assert all(0 <= c <= 1 for c in table["calibrated_coverage"].to_list())
    assert all((out / f"forecast_{m}.png").stat().st_size > 1000 for m in table["model"])


def _window_frame(v: np.ndarray, name: str = "s") -> pl.DataFrame:
    t = np.arange(len(v)) * HOUR
    return pl.DataFrame({"series": [name] * len(v), "window_start": t, "window_end": t + HOUR,
                         "count": [1] * len(v), "first": v, "last": v, "min": v, "max": v, "mean": v, "sum": v})


def test_cli_backtest_reads_a_window_store_and_reports_errors(tmp_path: Path) -> None:
    store = tmp_path / "history" / "part=0"
    store.mkdir(parents=True)
    frame = _window_frame(10 + np.sin(2 * np.pi * np.arange(200) / 24))
    frame.write_parquet(store / "a.parquet")
    staged = tmp_path / "history" / "_pending" / "obs-0" / "ckpt"  # an unfinished ingest checkpoint: hidden
    staged.mkdir(parents=True)
    frame.with_columns(pl.col("series") + "-staged").write_parquet(staged / "a.parquet")
    r = rollcast("backtest", str(tmp_path / "history"), "--models", "naive,seasonal_naive", "--context", "48",
                 "--horizon", "24", "--test-windows", "2", "--no-progress", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    default = pl.read_csv(tmp_path / "o" / "metrics.csv")
    assert default["mae"].to_list()[1] == pytest.approx(0, abs=1e-5)
    assert default["origin_every"].to_list() == [24, 24] and default["coverage_burn_in_origins"].to_list() == [0, 0]
    assert default["origins"].to_list() == [2, 2]
    assert "1 series" in r.stdout and "(origins 24 step(s) apart), burn-in 0" in r.stdout, r.stdout
    assert "excluded" not in r.stdout
    off = rollcast("backtest", str(tmp_path / "history"), "--models", "naive", "--context", "48", "--horizon", "24",
                   "--test-windows", "2", "--no-calibration", "--no-progress", "--out", str(tmp_path / "off"))
    assert off.returncode == 0, off.stderr
    assert "calibration: off" in off.stdout, off.stdout
    table = pl.read_csv(tmp_path / "off" / "metrics.csv")
    assert table["calibrated_coverage"].is_nan().all() and table["coverage"].is_finite().all()
    bad = rollcast("backtest", str(tmp_path / "history"), "--models", "nope", "--no-progress")
    assert bad.returncode == 1 and "known models" in bad.stderr and "Traceback" not in bad.stderr
    short = rollcast("backtest", str(tmp_path / "history"), "--models", "naive", "--test-windows", "50",
                     "--no-progress")
    assert short.returncode == 1 and "too few" in short.stderr and "Traceback" not in short.stderr


# ---------------------------------------------------------------- online calibration over the origins

CAL_Q = (0.1, 0.5, 0.9)


def _calibration(**env: str):
    return load_settings(env={f"ROLLCAST_CALIBRATION__{k}": v for k, v in env.items()}).calibration


def _stream(spacing: int, n_origins: int = 12, H: int = 4, S: int = 3, seed: int = 0):
    """Values ``(S, T)`` (one gap), origins ``spacing`` apart and too narrow float32 forecasts at each."""
    rng = np.random.default_rng(seed)
    origins = 5 + spacing * np.arange(n_origins)
    y = rng.normal(size=(S, int(origins[-1]) + H + 1)).astype(np.float32).astype(np.float64)
    y[1, int(origins[2]) + 1] = np.nan  # a gap window: settles nothing
    mid = rng.normal(0, 0.2, (S, n_origins, H, 1))
    fc = np.sort(mid + np.array(CAL_Q) - 0.5 + rng.normal(0, 0.05, (S, n_origins, H, 3)), axis=-1).astype(np.float32)
    fc[..., 1] = mid[..., 0]
    actuals = np.stack([y[:, o : o + H] for o in origins], axis=1)
    return y, origins, fc, actuals


def _reference(fc, actuals, origins, cal, versions):
    """Served quantiles by walking time window by window, one scalar offset at a time: at time t, first
    the forecast of origin t is served (its context ends at t - 1), then the window t closes and settles
    step t - o of every earlier origin o (of the serving model)."""
    S, n_origins, H, Q = fc.shape
    params = {"rates": tuple(cal.expert_rates), "beta": cal.weight_rate, "sigma": cal.mixing,
              "n0": cal.shrink_windows, "eta": cal.learning_rate, "max_offset": cal.max_offset,
              "delay": cal.delay_exponent}

    def fresh():  # no prior: every series starts from 0
        return [[ReferenceCell([0.0] * Q, 0.0, [0.0] * Q, CAL_Q, step=h + 1, **params) for h in range(H)]
                for _ in range(S)]

    c = fresh()
    served = np.full(fc.shape, np.nan, dtype=np.float32)
    current = versions[0]
    for t in range(int(origins[0]), int(origins[-1]) + 1):
        if t in origins:
            i = int(np.flatnonzero(origins == t)[0])
            if versions[i] != current:
                current = versions[i]
                if cal.on_new_champion == "reset":
                    c = fresh()
            offsets = np.array([[cell.offsets() for cell in row] for row in c])
            served[:, i] = calibrate(fc[:, i].astype(np.float64), offsets, 1).astype(np.float32)
        for j in range(n_origins):
            h = t - int(origins[j])
            if not (0 <= h < H) or versions[j] != current:
                continue
            for s in range(S):
                y = actuals[s, j, h]
                if np.isnan(y):
                    continue
                c[s][h].update(fc[s, j, h].astype(np.float64).tolist(),
                               served[s, j, h].astype(np.float64).tolist(), float(y))
    return served


@pytest.mark.parametrize("spacing", [1, 2, 4, 7])
def test_calibration_over_origins_serves_what_the_live_scorer_serves(spacing: int) -> None:
    """The forecast job's own Scorer, fed the same windows one at a time and issuing at the same origins,
    serves exactly these quantiles: origins closer than H (1, 2), H apart (4) and further (7)."""
    H, step = 4, 10
    y, origins, fc, actuals = _stream(spacing, H=H)
    S = len(y)
    ours = calibrate_sequentially(fc, actuals, origins, CAL_Q, _calibration())
    scorer = Scorer(load_settings(env={}), ModelRef("m", "1", list(CAL_Q)), H, step)
    live = np.full_like(ours, np.nan)
    names = [f"s{k}" for k in range(S)]
    for t in range(int(origins[0]) - 1, int(origins[-1])):  # window t; a forecast at t + 1 if it is an origin
        i = np.flatnonzero(origins == t + 1)
        preds = fc[:, i[0]] if len(i) else np.zeros((0, H, 3), np.float32)
        out = scorer.run(names, np.full(S, 1000 + t * step), y[:, t], np.zeros(S, np.int32),
                         np.arange(S) if len(i) else np.arange(0), preds, np.zeros((len(preds), H)), issued_at=t)
        for g in out.issued:
            live[g.index, i[0]] = g.served
    assert np.isfinite(live).all()
    np.testing.assert_array_equal(ours, live)
    assert not np.array_equal(ours, fc)  # it did calibrate


@pytest.mark.parametrize("spacing", [1, 3, 4, 6])
@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_calibration_over_origins_matches_a_window_by_window_reference(spacing: int, policy: str) -> None:
    _, origins, fc, actuals = _stream(spacing, n_origins=10)
    cal = _calibration(ON_NEW_CHAMPION=policy, LEARNING_RATE="0.3", MAX_OFFSET="0.5")  # the clip is reached
    versions = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])  # refits at origins 4 and 7
    ours = calibrate_sequentially(fc, actuals, origins, CAL_Q, cal, versions)
    np.testing.assert_array_equal(ours, _reference(fc, actuals, origins, cal, versions))
    if policy == "reset":  # a refit starts from the model's own quantiles
        np.testing.assert_allclose(ours[:, 4], fc[:, 4])
    else:
        assert not np.allclose(ours[:, 4], fc[:, 4])


@pytest.mark.parametrize("spacing", [2, 4])
def test_calibration_uses_no_actual_before_its_window_has_closed(spacing: int) -> None:
    """Served quantiles at origin k do not move whatever the actuals at or after it are; the actual of
    the window just before it (closed) does move them."""
    _, origins, fc, actuals = _stream(spacing, n_origins=10)
    cal = _calibration()
    base = calibrate_sequentially(fc, actuals, origins, CAL_Q, cal)
    k = 6
    when = origins[:, None] + np.arange(4)[None, :]  # (O, H): the time index of each actual
    future = np.where(when >= origins[k], -np.sign(actuals) * 1e6, actuals)  # every one flips its side
    peek = calibrate_sequentially(fc, future, origins, CAL_Q, cal)
    np.testing.assert_array_equal(peek[:, : k + 1], base[:, : k + 1])
    assert not np.array_equal(peek[:, k + 1 :], base[:, k + 1 :])
    just_closed = np.where(when == origins[k] - 1, -np.sign(actuals) * 1e6, actuals)
    moved = calibrate_sequentially(fc, just_closed, origins, CAL_Q, cal)
    np.testing.assert_array_equal(moved[:, :k], base[:, :k])
    assert not np.array_equal(moved[:, k], base[:, k])


def _noise(S: int = 8, T: int = 2000, seed: int = 3) -> SeriesMatrix:
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    return SeriesMatrix([f"n{k}" for k in range(S)], (10 + rng.normal(size=(S, T))).astype(np.float32),
                        (t + 1) * HOUR, HOUR)


def test_an_overconfident_model_is_calibrated_to_nominal_coverage() -> None:
    """Quantiles 10 +- 0.5 claim 80% of N(10, 1) noise and cover 38%; calibrated over the origins, the
    served interval covers 80% once the offsets have settled, and the whole backtest's far more than 38%."""
    data, H = _noise(), 4
    model = baseline("naive", 8, H, list(CAL_Q), 2)  # its config only: the forecasts are given
    origins = origins_for(data.values.shape[1], 8, H, 450)
    fc = np.broadcast_to(np.array([9.5, 10.0, 10.5], np.float32), (len(data.series), len(origins), H, 3))
    r = evaluate(model, data, origins, 2, forecasts=fc, calibration=_calibration())
    assert r.metrics["coverage"] < 0.45
    assert r.metrics["calibrated_coverage"] > 0.7
    later = slice(150, None)  # after the offsets' burn-in (~0.8 widths at 0.045 a step: 20-40 origins)
    settled = M.coverage(r.actuals[:, later], r.calibrated[:, later, :, 0], r.calibrated[:, later, :, -1])
    assert abs(settled - 0.8) < 0.03
    assert M.coverage(r.actuals[:, later], fc[:, later, :, 0], fc[:, later, :, -1]) < 0.45


def test_calibration_leaves_the_median_and_every_point_metric_unchanged() -> None:
    data = _seasonal()
    kw = {"n_origins": 6, "season": 8, "config": {"context": 16, "horizon": 4}}
    plain = rolling_origin("naive", data, **kw)
    cal = rolling_origin("naive", data, calibration=_calibration(LEARNING_RATE="0.5"), **kw)
    assert plain.calibrated is None and "calibrated_coverage" not in plain.metrics
    np.testing.assert_array_equal(cal.calibrated[..., 1], cal.forecasts[..., 1])
    np.testing.assert_array_equal(cal.forecasts, plain.forecasts)
    assert not np.allclose(cal.calibrated[..., [0, 2]], cal.forecasts[..., [0, 2]])  # the outer ones moved
    assert {k: v for k, v in cal.metrics.items() if k != "calibrated_coverage"} == plain.metrics
    assert cal.metrics["calibrated_coverage"] != plain.metrics["coverage"]
    off = rolling_origin("naive", data, calibration=_calibration(ENABLED="false"), **kw)
    assert off.calibrated is None and off.metrics == plain.metrics


def test_a_gap_window_settles_nothing_as_live() -> None:
    """A window with no observations carries the last value forward in the matrix (the actual scored),
    but live its value is NaN and settles nothing: the calibration skips it too."""
    data = _noise(S=2, T=200)
    known = np.ones_like(data.values, dtype=bool)
    origins = origins_for(200, 8, 4, 20)
    gap = int(origins[3]) + 1
    known[0, gap] = False
    values = data.values.copy()
    values[0, gap] = values[0, gap - 1] + 50  # far above every quantile: it would move the offsets
    gappy = SeriesMatrix(data.series, values, data.window_end_ms, data.step_ms, known)
    model = baseline("naive", 8, 4, list(CAL_Q), 2)
    r = evaluate(model, gappy, origins, 2, calibration=_calibration())
    settled = r.actuals.astype(np.float64)
    settled[0, 3, 1] = np.nan
    np.testing.assert_array_equal(r.calibrated, calibrate_sequentially(r.forecasts, settled, origins, CAL_Q,
                                                                       _calibration()))
    assert not np.array_equal(r.calibrated, calibrate_sequentially(r.forecasts, r.actuals, origins, CAL_Q,
                                                                   _calibration()))


# ---------------------------------------------------------------- an origin every window, a burn-in


def test_an_origin_every_window_serves_what_the_live_scorer_serves() -> None:
    """`rollcast backtest --origin-every 1` end to end (origins, forecasts, gaps, calibration): the forecast
    job's Scorer, fed the same windows one at a time and issuing the backtest's forecast at every window,
    serves exactly the backtest's calibrated quantiles."""
    H, step = 4, 10
    data = _noise(S=3, T=160)
    known = np.ones_like(data.values, dtype=bool)
    known[1, 120] = known[2, 131:133] = False  # gaps in the test span: they settle nothing, live or here
    data = SeriesMatrix(data.series, data.values, data.window_end_ms, data.step_ms, known)
    r = rolling_origin("naive", data, n_origins=60, season=2, config={"context": 8, "horizon": H},
                       origin_every=1, calibration=_calibration())
    assert np.diff(r.origins).tolist() == [1] * 59 and r.origins[-1] == 160 - H
    S = len(data.series)
    assert len(r.priors) == 1  # started from split-conformal offsets of the span before the first origin
    scorer = Scorer(load_settings(env={}), ModelRef("m", "1", list(r.quantiles)), H, step, r.priors[0])
    live = np.full_like(r.calibrated, np.nan)
    values = np.where(known, data.values, np.nan)  # live, a gap window has no value
    for i, origin in enumerate(r.origins):  # window origin - 1 closes, then the forecast at origin is issued
        t = int(origin) - 1
        out = scorer.run(data.series, np.full(S, 1000 + t * step), values[:, t], np.zeros(S, np.int32),
                         np.arange(S), r.forecasts[:, i], np.zeros((S, H)), issued_at=t)
        for g in out.issued:
            live[g.index, i] = g.served
    assert np.isfinite(live).all()
    np.testing.assert_array_equal(r.calibrated, live)
    assert not np.array_equal(r.calibrated, r.forecasts)  # it did calibrate


def _alternating(n_origins: int = 30, burn_in: int = 0, calibration: bool = True):
    """evaluate() of forecasts that cover every actual at every third origin and none elsewhere."""
    data, H = _noise(S=2, T=200), 4
    model = baseline("naive", 8, H, list(CAL_Q), 2)  # its config only: the forecasts are given
    origins = origins_for(200, 8, H, n_origins, every=1)
    wide = np.arange(n_origins) % 3 == 0
    half = np.where(wide, 100.0, 1e-3)[None, :, None]
    fc = np.stack([10 - half, np.full_like(half, 10.0), 10 + half], axis=-1)
    fc = np.broadcast_to(fc, (2, n_origins, H, 3)).astype(np.float32)
    return evaluate(model, data, origins, 2, forecasts=fc, calibration=_calibration() if calibration else None,
                    burn_in=burn_in)


@pytest.mark.parametrize("burn_in", [1, 7, 11])
def test_burn_in_leaves_exactly_the_first_origins_out_of_both_coverages(burn_in: int) -> None:
    full, r = _alternating(), _alternating(burn_in=burn_in)
    def cover(band: np.ndarray, start: int) -> float:
        return M.coverage(r.actuals[:, start:], band[:, start:, :, 0], band[:, start:, :, -1])
    for key, band in (("coverage", r.forecasts), ("calibrated_coverage", r.calibrated)):
        assert r.metrics[key] == cover(band, burn_in)
        assert cover(band, burn_in - 1) != r.metrics[key] != cover(band, burn_in + 1)  # one origin more or less shows
    assert r.burn_in == burn_in and full.burn_in == 0
    np.testing.assert_array_equal(r.calibrated, full.calibrated)  # the burn-in origins still calibrated
    assert full.metrics["coverage"] == cover(r.forecasts, 0)
    points = ("mae", "rmse", "smape", "mase", "rel_mae_naive", "rel_mae_seasonal_naive")
    assert {k: r.metrics[k] for k in points} == {k: full.metrics[k] for k in points}  # over every origin
    with pytest.raises(NotEnoughData, match="burn-in"):
        _alternating(n_origins=30, burn_in=30)
    with pytest.raises(NotEnoughData, match="burn-in"):
        _alternating(burn_in=-1)


def test_refits_with_an_origin_every_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """--refit-every counts origins whatever their spacing: each model forecasts only the origins from its
    fit to the next, fitted on the data before its first one, and is a new champion for the calibration."""
    fitted: list[tuple[int, int]] = []  # (model id, origin it was fitted before)
    calls: list[tuple[int, list[int]]] = []
    held: list[object] = []  # every fitted model stays alive, so no later one is given a freed one's id
    monkeypatch.setattr(B, "_fit_before", lambda model, data, origin, *a: held.append(model)
                        or fitted.append((id(model), origin)) or FitResult(epochs=1))
    real = B.forecast_at
    monkeypatch.setattr(B, "forecast_at", lambda model, data, origins: calls.append((id(model), origins.tolist()))
                        or real(model, data, origins))
    monkeypatch.setattr(B, "PROGRESS_ORIGINS", 3)
    seen: list[int] = []
    r = rolling_origin("tcn", _seasonal(), n_origins=12, season=8, refit_every=5, origin_every=1,
                       config={"context": 16, "horizon": 4, "channels_hidden": 8}, on_origin=seen.append,
                       calibration=_calibration(ON_NEW_CHAMPION="reset"))
    o = r.origins.tolist()
    assert [origin for _, origin in fitted] == [o[0], o[5], o[10]] and len(r.fits) == 3
    by_model = {m: [] for m, _ in fitted}
    fit_origin = dict(fitted)
    for m, batch in calls:
        # not a baseline, nor the forecasts of the fit's validation span the calibration starts from (all
        # of them before the fit's first test origin)
        if m in by_model and min(batch) >= fit_origin[m]:
            by_model[m] += batch
        elif m in by_model:
            assert max(batch) <= fit_origin[m] - 4
    assert list(by_model.values()) == [o[0:5], o[5:10], o[10:12]]
    assert seen == list(range(12))
    cal, settled = _calibration(ON_NEW_CHAMPION="reset"), r.actuals.astype(np.float64)
    assert len(r.priors) == 3  # each fit's calibration starts from its own split-conformal offsets
    priors = dict(zip([1, 2, 3], r.priors, strict=True))
    swaps = calibrate_sequentially(r.forecasts, settled, r.origins, r.quantiles, cal, np.repeat([1, 2, 3], [5, 5, 2]),
                                   priors, r.series)
    np.testing.assert_array_equal(r.calibrated, swaps)  # a new champion at each refit
    assert not np.array_equal(r.calibrated, calibrate_sequentially(r.forecasts, settled, r.origins, r.quantiles, cal,
                                                                   priors=priors, series=r.series))


def test_plots_draw_forecasts_of_origins_at_least_h_apart(tmp_path: Path) -> None:
    assert plotted_origins(np.arange(100, 112), 4).tolist() == [0, 4, 8]
    assert plotted_origins(np.arange(100, 140, 4), 4).tolist() == list(range(10))  # H apart: all
    assert plotted_origins(np.arange(0, 60, 5), 24).tolist() == [0, 5, 10]  # 0, 25, 50
    assert plotted_origins(np.arange(0, 60, 30), 24).tolist() == [0, 1]
    r = _alternating(burn_in=7)
    for every in (1, 3, 6):  # overlapping, not dividing H, further than H
        data = _noise(S=2, T=200)
        res = rolling_origin("naive", data, n_origins=20, season=2, config={"context": 8, "horizon": 4},
                             origin_every=every, burn_in=5, calibration=_calibration())
        plot_backtest(tmp_path / f"p{every}.png", res, data)
        assert (tmp_path / f"p{every}.png").stat().st_size > 1000
    plot_backtest(tmp_path / "alt.png", r, _noise(S=2, T=200))


def test_cli_backtest_origins_every_window_after_a_burn_in(tmp_path: Path) -> None:
    store = tmp_path / "history"
    store.mkdir()
    rng = np.random.default_rng(5)
    v = 10 + np.sin(2 * np.pi * np.arange(300) / 24) + rng.normal(0, 0.3, 300)
    frame = _window_frame(v)
    frame.write_parquet(store / "a.parquet")
    flags = ["--context", "48", "--horizon", "6", "--season", "24", "--test-windows", "80", "--no-progress"]
    r = rollcast("backtest", str(store), "--models", "naive,seasonal_naive", *flags, "--origin-every", "1",
                 "--burn-in", "20", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "80 test windows (origins 1 step(s) apart), burn-in 20 origin(s)" in r.stdout, r.stdout
    assert "over origins 21-80, the first 20 (burn-in) excluded; other metrics over all 80 origins" in \
        " ".join(r.stdout.split()), r.stdout
    table = pl.read_csv(tmp_path / "o" / "metrics.csv")
    assert table["origins"].to_list() == [80, 80] and table["origin_every"].to_list() == [1, 1]
    assert table["coverage_burn_in_origins"].to_list() == [20, 20]
    data = windows_to_matrix(frame, "mean")
    for row in table.iter_rows(named=True):
        ours = rolling_origin(row["model"], data, n_origins=80, season=24, origin_every=1, burn_in=20,
                              config={"context": 48, "horizon": 6, "season": 24,
                                      "quantiles": load_settings(env={}).model.quantiles},
                              calibration=load_settings(env={}).calibration)
        for key in ("mae", "coverage", "calibrated_coverage"):
            assert row[key] == pytest.approx(ours.metrics[key], rel=1e-9), key
    short = rollcast("backtest", str(store), "--models", "naive", *flags, "--burn-in", "80")
    assert short.returncode == 1 and "leaves none" in short.stderr and "Traceback" not in short.stderr
    zero = rollcast("backtest", str(store), "--models", "naive", *flags, "--origin-every", "0")
    assert zero.returncode == 2 and "at least 1" in zero.stderr
