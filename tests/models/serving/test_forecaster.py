"""The Forecaster: batched inference over the in-memory contexts, equal to offline inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

import models
from models.serving.forecaster import MESSAGE_CHUNK, LoadedModel
from pipeline.store import HistoryStore, Progress
from tests.support.forecast import STEP, H, L, forecast_messages, make_windows

if TYPE_CHECKING:
    from collections.abc import Iterable

    import pyarrow as pa

    from models.serving.forecaster import Forecaster


def forecast(forecaster: Forecaster, keys: Iterable[tuple[str, int]], issued_at: int, chunk: int = MESSAGE_CHUNK,
             batch: list[pa.Table] | None = None) -> list[list[tuple[str, bytes]]]:
    """The forecast messages of one inference, without scoring, in chunks."""
    inference = forecaster.infer(keys, issued_at, batch=batch or [])
    return [] if inference is None else list(forecaster.messages(inference, chunk=chunk))


def test_forecasts_come_in_chunks_equal_to_one_offline_inference(tmp_path: Path) -> None:
    from models.serving.forecaster import Forecaster
    from pipeline.config import load_settings

    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_WINDOW__LENGTH_MS": str(STEP),
                           "ROLLCAST_MODEL__CONTEXT": str(L), "ROLLCAST_CALIBRATION__ENABLED": "false"})
    module = models.create_model("lstm", context=L, horizon=H, hidden=4)
    for p in module.parameters():  # not the zero-initialised head: outputs differ per series
        torch.nn.init.normal_(p, std=0.3)
    model = LoadedModel("lstm", "1", module, L, H, list(module.config.quantiles))
    names = [f"s{i}" for i in range(7)]
    windows = make_windows(names, L + 2)
    forecaster = Forecaster(s, model)
    forecaster.add(windows.to_arrow())
    last = int(windows["window_end"].max())
    keys = [(name, last) for name in names] + [("s3", last), ("unknown", last)]  # a repeat; no context
    chunks = forecast(forecaster, keys, issued_at=9, chunk=3)
    assert [len(c) for c in chunks] == [3, 3, 1]  # each series once, those with context only
    contexts = np.stack([windows.filter(pl.col("series") == n).sort("window_end")["last"].to_numpy()[-L:]
                         for n in names])
    grid = last - STEP * np.arange(L - 1, -1, -1)
    offline = models.predict(module, contexts, window_end_ms=np.broadcast_to(grid, contexts.shape))
    assert [m for c in chunks for m in c] == forecast_messages(names, [last] * 7, offline, model, STEP, issued_at=9)
    assert [m for c in forecast(forecaster, keys, issued_at=9, chunk=100) for m in c] == [
        m for c in chunks for m in c]


def test_a_batch_longer_than_the_buffer_is_forecast_before_the_store_holds_it(tmp_path: Path) -> None:
    """Ingest produces a checkpoint's windows before it writes them to the store: a batch with more
    windows of a series than the buffer holds (gap rows after a long silence, a lagging restart)
    takes the contexts of its older windows from the batch itself when the store has none yet."""
    from models.serving.forecaster import Forecaster
    from pipeline.config import load_settings

    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_WINDOW__LENGTH_MS": str(STEP),
                           "ROLLCAST_MODEL__CONTEXT": str(L), "ROLLCAST_CALIBRATION__ENABLED": "false"})
    module = models.create_model("lstm", context=L, horizon=H, hidden=4)
    model = LoadedModel("lstm", "1", module, L, H, list(module.config.quantiles))
    forecaster = Forecaster(s, model)
    windows = make_windows(["a", "b"], 4 * forecaster.capacity)
    assert HistoryStore(s).count() == 0
    table = windows.to_arrow()
    keys = forecaster.add(table)
    got = {(m[0], json.loads(m[1])["last_window_end"])
           for c in forecast(forecaster, keys, issued_at=1, batch=[table]) for m in c}
    ends = windows.filter(pl.col("series") == "b")["window_end"].to_list()
    assert {("b", e) for e in ends[L - 1:]} <= got  # every window with a full context, none skipped
    # in "a" too, the context starting at its gap row included (the gap rule: it takes the first known value)
    assert len(got) == len(keys) - 2 * (L - 1)
    assert not forecast(forecaster, keys[:1], issued_at=1)  # without them, the empty store has no context


def test_a_partition_assigned_again_takes_what_another_consumer_read_meanwhile_from_the_store(
        tmp_path: Path) -> None:
    """A forecast process built its buffers from the store, then another consumer of the group read
    windows 10..19 of the series (they reached the store, not this process). When the partition is
    assigned here (moved, or kept through an eager rebalance) and window 20 arrives, its context comes
    from the store: the forecast equals offline inference over all windows. A process not told of the
    assignment has no context for it (what the job did before)."""
    from models.serving.forecaster import Forecaster
    from pipeline.config import load_settings

    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_WINDOW__LENGTH_MS": str(STEP),
                           "ROLLCAST_MODEL__CONTEXT": str(L), "ROLLCAST_WINDOW__TARGET": "last",
                           "ROLLCAST_CALIBRATION__ENABLED": "false"})
    module = models.create_model("lstm", context=L, horizon=H, hidden=4)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model = LoadedModel("lstm", "1", module, L, H, list(module.config.quantiles))
    windows = make_windows(["a", "b"], 21).sort("series", "window_start")
    step = pl.col("window_start").rank("ordinal").over("series") - 1
    early, meanwhile, latest = (windows.filter(c) for c in (step < 10, (step >= 10) & (step < 20), step == 20))
    store = HistoryStore(s)
    store.write_checkpoint("obs", 0, early, Progress(1, None))
    here, unaware = Forecaster(s, model), Forecaster(s, model)
    for f in (here, unaware):
        f.rebuild()
    store.write_checkpoint("obs", 0, meanwhile, Progress(2, None))  # read and forecast by the other consumer
    here.assigned([0])
    got = {}
    for f in (here, unaware):
        table = latest.to_arrow()
        keys = f.add(table)
        f.refresh([(0, table)])
        got[f] = {m[0]: json.loads(m[1]) for c in forecast(f, keys, issued_at=1, batch=[table]) for m in c}
    assert got[unaware] == {}  # short contexts: the windows read elsewhere are missing
    assert sorted(got[here]) == ["a", "b"]
    last = int(latest["window_end"].max())
    contexts = np.stack([windows.filter(pl.col("series") == x)["last"].to_numpy()[-L:] for x in ("a", "b")])
    grid = last - STEP * np.arange(L - 1, -1, -1)
    offline = models.predict(module, contexts, window_end_ms=np.broadcast_to(grid, contexts.shape))
    want = {m[0]: json.loads(m[1]) for m in forecast_messages(["a", "b"], [last] * 2, offline, model, STEP, issued_at=1)}
    assert got[here] == want


def test_a_saved_model_with_its_graph_is_served_by_onnx_runtime(tmp_path: Path) -> None:
    """load_saved_model serves the ONNX graph saved with the weights; the inference equals the module's
    within the compiled path's tolerance, gap row included (one gap rule, before either runs)."""
    from models.compiled import ATOL, ONNXRUNTIME, RTOL
    from models.serving.forecaster import Forecaster, load_saved_model
    from pipeline.config import load_settings

    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_WINDOW__LENGTH_MS": str(STEP),
                           "ROLLCAST_MODEL__CONTEXT": str(L), "ROLLCAST_CALIBRATION__ENABLED": "false"})
    module = models.create_model("lstm", context=L, horizon=H, hidden=4, calendar=True)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model = load_saved_model(models.save_model(module, tmp_path / "model"), "1")
    assert model.runtime == ONNXRUNTIME
    names = [f"s{i}" for i in range(5)]
    windows = make_windows(names, L + 2)  # s0 has a gap row in its context
    forecaster = Forecaster(s, model)
    forecaster.add(windows.to_arrow())
    last = int(windows["window_end"].max())
    inference = forecaster.infer([(name, last) for name in names], issued_at=9)
    assert inference is not None and inference.names == names
    contexts = np.stack([windows.filter(pl.col("series") == n).sort("window_end")["last"].to_numpy()[-L:]
                         for n in names])
    assert np.isnan(contexts[0]).any()
    grid = np.broadcast_to(last - STEP * np.arange(L - 1, -1, -1), contexts.shape)
    np.testing.assert_array_equal(inference.preds, models.predict(model.compiled, contexts, window_end_ms=grid))
    np.testing.assert_allclose(inference.preds, models.predict(module, contexts, window_end_ms=grid),
                               rtol=RTOL, atol=ATOL)
