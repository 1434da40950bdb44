"""Samples drawn per batch from the series matrix, and the matrix read from the store in bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch.utils.data import DataLoader

from models.base import CALENDAR_CHANNELS
from models.data import (
    SeriesMatrix,
    calendar_features,
    fill_gaps,
    read_matrix,
    windows_to_matrix,
)
from models.registry import create_model
from models.train.sampling import WindowSamples, as_batch, draw_plan, gather, training_samples
from pipeline.config import TrainSettings
from pipeline.store import HistoryStore, Progress

HOUR = 3_600_000


def _gappy(n_t: int = 60, seed: int = 0) -> pl.DataFrame:
    """Three series: ``a`` complete, ``b`` starting at t=20, ``c`` with a long gap (t=10..39) and short ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, start in (("a", 0), ("b", 20), ("c", 0)):
        for t in range(start, n_t):
            gap = s == "c" and (10 <= t < 40 or t % 7 == 3)
            v = None if gap else float(rng.normal(10, 1))
            rows.append({"series": s, "window_start": t * HOUR, "window_end": (t + 1) * HOUR,
                         "count": 0 if gap else 3, "first": v, "last": v, "min": v, "max": v, "mean": v, "sum": v})
    return pl.DataFrame(rows)


def _pairs(x: np.ndarray, y: np.ndarray) -> list[tuple]:
    return sorted(zip(map(bytes, x.astype(np.float32)), map(bytes, y.astype(np.float32)), strict=True))


def _every_sample(m: SeriesMatrix, L: int, H: int, span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """By hand, one sample at a time: every (context, targets) with targets in ``span``, the window after the
    series' first value, the context through the gap rule and holding a known value, calendar channels."""
    xs, ys = [], []
    for s in range(len(m.series)):
        for t in range(max(span[0], L), span[1] - H + 1):
            ctx = m.contexts(t - L, t)[s : s + 1]
            if np.isnan(m.values[s, t - L : t + H]).any() or np.isnan(ctx).all():
                continue
            cal = calendar_features(m.window_end_ms[t - L : t])
            xs.append(np.concatenate([fill_gaps(ctx)[0][:, None], cal], axis=1))
            ys.append(m.values[s, t : t + H])
    return np.array(xs, np.float32), np.array(ys, np.float32)


def test_one_epoch_over_a_small_span_is_every_sample_once_with_the_gap_rule() -> None:
    m = windows_to_matrix(_gappy(), "mean")
    assert m.values.dtype == np.float32 and m.known is not None
    L, H, span = 8, 3, (8, 60)
    ref_x, ref_y = _every_sample(m, L, H, span)
    ds = WindowSamples(m, L, H, calendar=True, span=span, budget=10_000, seed=0)
    assert len(ds) == len(ref_x)  # the budget exceeds the span: one pass
    x, y = ds.__getitems__(list(range(len(ds))))
    assert x.shape == (len(ref_x), L, 1 + CALENDAR_CHANNELS) and y.shape == (len(ref_x), H)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert _pairs(x.numpy(), y.numpy()) == _pairs(ref_x, ref_y)
    # calendar channels are those of the context's window ends
    s, t = ds.series[0], ds.t[0]
    np.testing.assert_allclose(x[0, :, 1:].numpy(), calendar_features(m.window_end_ms[t - L : t]), atol=1e-6)
    np.testing.assert_array_equal(x[0, :, 0].numpy(), fill_gaps(m.contexts(t - L, t)[s : s + 1])[0])  # the gap rule
    np.testing.assert_array_equal(y[0].numpy(), m.values[s, t : t + H])
    # no context reaches before b's first window (t=20); c's contexts inside its long gap have no known value
    b, c = m.series.index("b"), m.series.index("c")
    assert (ds.t[ds.series == b] - L >= 20).all()
    ctx_known = np.array([m.known[c, t - L : t].any() for t in ds.t[ds.series == c]])
    assert ctx_known.all() and (ds.series == c).sum() < 60 - L - H + 1


def test_a_budget_draws_that_many_samples_per_epoch_anew_and_deterministically() -> None:
    m = windows_to_matrix(_gappy(400), "mean")
    L, H, span = 8, 3, (8, 400)
    ds = WindowSamples(m, L, H, calendar=False, span=span, budget=500, seed=7)
    first = (ds.series.copy(), ds.t.copy())
    assert len(ds) == 500
    ds.set_epoch(1)
    assert len(ds) == 500 and not np.array_equal(ds.t, first[1])  # a new draw per epoch
    again = WindowSamples(m, L, H, calendar=False, span=span, budget=500, seed=7)
    np.testing.assert_array_equal(again.t, first[1])  # the same seed: the same plan
    np.testing.assert_array_equal(again.series, first[0])
    again.set_epoch(1)
    np.testing.assert_array_equal(again.t, ds.t)
    other = WindowSamples(m, L, H, calendar=False, span=span, budget=500, seed=8)
    assert not np.array_equal(other.t, first[1])
    for epoch in range(3):  # every draw obeys the gap rule and the span
        ds.set_epoch(epoch)
        b, c = m.series.index("b"), m.series.index("c")
        assert (ds.t >= 8).all() and (ds.t + H <= 400).all()
        assert (ds.t[ds.series == b] - L >= 20).all()
        assert all(m.known[c, t - L : t].any() for t in ds.t[ds.series == c])
    x, y = ds.__getitems__(list(range(len(ds))))
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    val = WindowSamples(m, L, H, calendar=False, span=span, budget=500, seed=7, resample=False, salt=1)
    before = val.t.copy()
    val.set_epoch(3)
    np.testing.assert_array_equal(val.t, before)  # validation keeps its draw


def test_a_series_starting_late_gives_samples_only_once_its_context_is_whole() -> None:
    """Series a (0..5, a gap at t=3 carrying 2) and b (from t=2, 12..15), L=2, H=1: a's targets t=2..5,
    b's only t=4, 5; a context starting at the gap takes its first known value (the gap rule), not the 2
    carried over the gap."""
    rows = []
    for s, n, offset in (("a", 6, 0), ("b", 4, 2)):
        for i in range(n):
            t, gap = (i + offset) * HOUR, s == "a" and i == 3
            v = None if gap else float(10 * (s == "b") + i + offset)
            rows.append({"series": s, "window_start": t, "window_end": t + HOUR, "count": 0 if gap else 2,
                         "first": v, "last": v, "min": v, "max": v, "mean": v, "sum": v})
    m = windows_to_matrix(pl.DataFrame(rows), "mean")
    ds = WindowSamples(m, 2, 1, calendar=False, span=(0, 6), budget=100, seed=0)
    order = np.lexsort((ds.t, ds.series))
    assert list(zip(ds.series[order].tolist(), ds.t[order].tolist(), strict=True)) == [
        (0, 2), (0, 3), (0, 4), (0, 5), (1, 4), (1, 5)]
    x, y = gather(m, ds.series[order], ds.t[order], 2, 1, calendar=False)
    np.testing.assert_array_equal(y[:, 0], [2, 2, 4, 5, 14, 15])
    np.testing.assert_array_equal(x[:, :, 0], [[0, 1], [1, 2], [2, 2], [4, 4], [12, 13], [13, 14]])


def test_training_samples_follow_the_train_settings() -> None:
    """The one way a fit's samples are drawn (a training cycle, a backtest's refit): samples_per_epoch pairs
    anew each epoch (recency-weighted when set), a fixed validation draw of validation_samples, salted apart
    from the training draw, seeded by the seed given."""
    m = windows_to_matrix(_gappy(400), "mean")
    cfg = create_model("lstm", context=8, horizon=3, calendar=True, hidden=4, layers=1).config
    settings = TrainSettings(samples_per_epoch=300, validation_samples=40, recency_half_life_windows=50)
    fit_set, val_set = training_samples(m, cfg, (8, 350), (350, 400), settings, seed=3)
    assert (fit_set.span, fit_set.budget, fit_set.half_life, fit_set.seed) == ((8, 350), 300, 50, 3)
    assert (val_set.span, val_set.budget, val_set.seed, val_set.salt) == ((350, 400), 40, 3, 1)
    assert fit_set.calendar and val_set.calendar and fit_set.resample and not val_set.resample
    assert len(fit_set) == 300 and len(val_set) == 40
    assert (fit_set.t + 3 <= 350).all() and (val_set.t >= 350).all()
    rng = np.random.default_rng([3, 0, 0])  # the plan of epoch 0 is draw_plan's with the train settings
    s, t = draw_plan(m, 8, 3, (8, 350), 300, rng, half_life=50)
    np.testing.assert_array_equal(fit_set.series, s)
    np.testing.assert_array_equal(fit_set.t, t)
    before = val_set.t.copy()
    fit_set.set_epoch(1)
    val_set.set_epoch(1)
    assert not np.array_equal(fit_set.t, t) and np.array_equal(val_set.t, before)
    # a budget above what the span holds: every valid pair once, as a default-sized budget over a small span
    small, _ = training_samples(m, cfg, (8, 60), (60, 70), TrainSettings(), seed=0)
    assert len(small) == len(_every_sample(m, 8, 3, (8, 60))[0])


def test_recency_weighting_halves_the_weight_every_half_life() -> None:
    m = SeriesMatrix([f"s{i}" for i in range(40)], np.ones((40, 2000), np.float32), np.arange(2000) * HOUR, HOUR)
    rng = np.random.default_rng(0)
    L, H, h = 10, 5, 100
    s, t = draw_plan(m, L, H, (L, 2000), 40_000, rng, half_life=h)
    last = 2000 - H  # the newest target start
    assert len(t) == 40_000 and t.max() <= last and t.min() >= L
    share = np.mean(t > last - h)  # half the mass lies within one half-life of the newest target
    assert 0.47 < share < 0.53, share
    assert 0.72 < np.mean(t > last - 2 * h) < 0.78  # three quarters within two
    _, uniform = draw_plan(m, L, H, (L, 2000), 40_000, rng)
    assert 0.03 < np.mean(uniform > last - h) < 0.07  # ~100 of ~1986 steps


def test_a_data_loader_gets_whole_batches_from_getitems() -> None:
    m = windows_to_matrix(_gappy(200), "mean")
    ds = WindowSamples(m, 8, 3, calendar=True, span=(8, 200), budget=300, seed=0)
    calls = []
    orig = ds.__getitems__
    ds.__getitems__ = lambda idx: calls.append(len(idx)) or orig(idx)
    batches = list(DataLoader(ds, batch_size=128, shuffle=False, collate_fn=as_batch))
    assert [b[0].shape[0] for b in batches] == [128, 128, 44] and calls == [128, 128, 44]
    assert batches[0][0].shape == (128, 8, 5) and batches[0][1].shape == (128, 3)


def test_reading_the_store_in_batches_equals_the_one_shot_pivot(tmp_path: Path) -> None:
    table = _gappy(90)
    store = HistoryStore(tmp_path / "history")
    for i, part in enumerate((table.filter(pl.col("window_start") < 50 * HOUR), table.filter(pl.col("window_start") >= 50 * HOUR))):
        store.write_checkpoint("t", i, part, Progress(position=part.height, max_ts=int(part["window_end"].max())))
    lo, hi = 5 * HOUR, 85 * HOUR
    ref = windows_to_matrix(store.read(start_ms=lo, end_ms=hi), "mean")
    for batch_rows in (7, 1 << 20):  # many small batches, and one
        got, rows, first = read_matrix(store, lo, hi, "mean", batch_rows=batch_rows)
        assert got.series == ref.series and got.step_ms == ref.step_ms and got.values.dtype == np.float32
        np.testing.assert_array_equal(got.values, ref.values)
        np.testing.assert_array_equal(got.known, ref.known)
        np.testing.assert_array_equal(got.window_end_ms, ref.window_end_ms)
        assert rows == store.read(start_ms=lo, end_ms=hi).height and first == 5 * HOUR
    with pytest.raises(Exception, match="empty"):
        read_matrix(store, 1000 * HOUR, 1001 * HOUR)


def test_reading_the_store_on_the_window_grid_in_one_pass_equals_the_one_shot_pivot(tmp_path: Path) -> None:
    """``step_ms`` (the train cycle's path): one pass, rows grown past the newest day's series count, names
    sorted (written here in reverse order), columns trimmed to the windows read, gaps as before."""
    table = _gappy(90)
    more = pl.concat([table.filter(pl.col("series") == "a").with_columns(pl.lit(f"z{i:03d}").alias("series"))
                      for i in range(80)])  # 80 series that end before the newest day: more than estimated
    more = more.filter(pl.col("window_start") < 40 * HOUR)
    table = pl.concat([table, more]).sort("series", descending=True)
    store = HistoryStore(tmp_path / "history")
    for i, part in enumerate((table.filter(pl.col("window_start") < 50 * HOUR), table.filter(pl.col("window_start") >= 50 * HOUR))):
        store.write_checkpoint("t", i, part, Progress(position=part.height, max_ts=int(part["window_end"].max())))
    assert store.last_window_end() == 90 * HOUR and store.newest_day_series() == 3
    for lo, hi in ((5 * HOUR, 85 * HOUR), (-3 * HOUR + 1, 200 * HOUR), (45 * HOUR, 60 * HOUR)):
        ref = windows_to_matrix(store.read(start_ms=lo, end_ms=hi), "mean")
        for batch_rows in (7, 1 << 20):
            got, rows, first = read_matrix(store, lo, hi, "mean", batch_rows=batch_rows, step_ms=HOUR)
            assert got.series == ref.series and got.step_ms == ref.step_ms and got.values.dtype == np.float32
            assert got.values.flags.c_contiguous and got.values.shape == ref.values.shape
            np.testing.assert_array_equal(got.values, ref.values)
            np.testing.assert_array_equal(got.known, ref.known)
            np.testing.assert_array_equal(got.window_end_ms, ref.window_end_ms)
            assert rows == store.read(start_ms=lo, end_ms=hi).height and first == ref.window_end_ms[0] - HOUR
    # windows not on the grid of step_ms (another window length): read as without it
    got, _, _ = read_matrix(store, 5 * HOUR, 85 * HOUR, "mean", step_ms=7 * HOUR)
    ref = windows_to_matrix(store.read(start_ms=5 * HOUR, end_ms=85 * HOUR), "mean")
    np.testing.assert_array_equal(got.values, ref.values)
    with pytest.raises(Exception, match="empty"):
        read_matrix(store, 1000 * HOUR, 1001 * HOUR, step_ms=HOUR)
    assert HistoryStore(tmp_path / "none").last_window_end() is None
