"""The forecast job against the real broker: every window gets a forecast equal to offline inference."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from kafka import TopicPartition

import models
from models.serving import LoadedModel
from pipeline.config import Settings
from pipeline.contexts import ContextBuffers
from pipeline.forecasts_io import forecast_message_chunks
from pipeline.kafka import make_consumer, make_producer
from pipeline.store import HistoryStore, Progress
from pipeline.windows import WINDOW_SCHEMA
from pipeline.windows_io import HEADERS, WindowRouter, complete_batch
from tests.jobs.helpers import rollcast, start_rollcast, wait_for

STEP = 1000
L, H = 8, 3


# ----------------------------------------------------------------------------- pure logic


def test_buffers_give_the_context_ending_at_a_window_and_replace_repeats() -> None:
    buf = ContextBuffers(capacity=5, step_ms=STEP)
    for i in range(1, 8):
        buf.put(["a"], np.array([i * STEP]), np.array([float(i)]))
    buf.put(["b", "b"], np.array([2000, 1000]), np.array([20.0, 10.0]))  # out of order within a batch
    rows = buf.row_of(["a", "a", "a", "a", "b"])
    ctx, ok, evicted = buf.contexts(rows, np.array([7000, 5000, 5000, 7500, 2000]), 3)
    np.testing.assert_array_equal(ctx[0], [5.0, 6.0, 7.0])
    np.testing.assert_array_equal(ctx[1], [3.0, 4.0, 5.0])
    assert ok.tolist() == [True, True, True, False, False]  # 7500 ends no window; "b" has only 2 windows
    assert evicted.tolist() == [False, False, False, False, False]
    _, ok, evicted = buf.contexts(buf.row_of(["a"]), np.array([5000]), 4)  # 2000 was pushed out: bounded
    assert not ok[0] and evicted[0]  # older than the buffer: the job reads the store for it
    _, ok, evicted = buf.contexts(buf.row_of(["a"]), np.array([7000]), 6)  # longer than the buffer
    assert not ok[0] and evicted[0]
    _, ok, _ = buf.contexts(buf.row_of(["b"]), np.array([2000]), 2)
    assert ok[0]
    buf.put(["a"], np.array([6000]), np.array([60.0]))  # a repeat after a restart replaces the value
    ctx, _, _ = buf.contexts(buf.row_of(["a"]), np.array([7000]), 3)
    np.testing.assert_array_equal(ctx[0], [5.0, 60.0, 7.0])
    buf.put(["a"], np.array([1000]), np.array([99.0]))  # older than everything held: not stored
    ctx, ok, _ = buf.contexts(buf.row_of(["a"]), np.array([7000]), 5)
    assert ok[0] and ctx[0].tolist() == [3.0, 4.0, 5.0, 60.0, 7.0]
    gaps = ContextBuffers(capacity=10, step_ms=STEP)
    gaps.put(["c"] * 3, np.array([1000, 2000, 4000]), np.ones(3))
    _, ok, evicted = gaps.contexts(gaps.row_of(["c"]), np.array([4000]), 3)
    assert not ok[0] and not evicted[0]  # 3000 missing: not a regular grid, and not older than the buffer
    many = ContextBuffers(capacity=4, step_ms=STEP)  # rows grow as series arrive
    names = [f"s{i}" for i in range(200)]
    many.put(names, np.full(200, 1000), np.arange(200.0))
    ctx, ok, _ = many.contexts(many.row_of(names[::-1]), np.full(200, 1000), 1)
    assert ok.all() and ctx[:, 0].tolist() == list(np.arange(200.0)[::-1]) and len(many) == 200


def forecast_messages(*args: Any, **kwargs: Any) -> list[tuple[str, bytes]]:
    """All of :func:`forecast_message_chunks`'s messages in one list."""
    return [m for chunk in forecast_message_chunks(*args, **kwargs) for m in chunk]


def test_message_format_follows_the_contract() -> None:
    model = LoadedModel("tcn", "3", None, L, 2, [0.1, 0.5, 0.9])
    preds = np.array([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    [(key, value)] = forecast_messages(["s1"], [10_000], preds, model, STEP, issued_at=123)
    assert key == "s1"
    assert json.loads(value) == {
        "series": "s1", "issued_at": 123, "last_window_end": 10_000,
        "model": {"name": "tcn", "version": "3"}, "step_ms": STEP,
        "points": [
            {"ts": 10_000, "mean": 2.0, "quantiles": {"0.1": 1.0, "0.5": 2.0, "0.9": 3.0}},
            {"ts": 11_000, "mean": 5.0, "quantiles": {"0.1": 4.0, "0.5": 5.0, "0.9": 6.0}},
        ],
    }


def test_messages_are_valid_json_for_any_series_id_and_keep_float32_values_exactly() -> None:
    model = LoadedModel("tcn", "7", None, L, 4, [0.1, 0.5, 0.9])
    rng = np.random.default_rng(0)
    preds = np.sort(rng.normal(0, 1e4, (4, 4, 3)).astype(np.float32), axis=-1)
    preds[3, 2, 1] = np.nan  # a model that emitted NaN: null, still valid JSON
    series = ['plain', 'quo"te\\back', "tab\tnew\nline", "ünïcödé €"]
    out = forecast_messages(series, [1000, 2000, 3000, 4000], preds, model, STEP, issued_at=5)
    assert [k for k, _ in out] == series
    for i, (key, value) in enumerate(out):
        msg = json.loads(value)
        assert msg["series"] == key and msg["last_window_end"] == 1000 * (i + 1) and msg["issued_at"] == 5
        assert [p["ts"] for p in msg["points"]] == [1000 * (i + 1) + h * STEP for h in range(4)]
        for h, p in enumerate(msg["points"]):
            for j, q in enumerate(("0.1", "0.5", "0.9")):
                want = preds[i, h, j]
                got = p["quantiles"][q]
                assert (got is None) if np.isnan(want) else np.float32(got) == want  # shortest repr round-trips
            assert p["mean"] == p["quantiles"]["0.5"]


def test_forecasts_come_in_chunks_equal_to_one_offline_inference(tmp_path: Path) -> None:
    from models.serving import Forecaster
    from pipeline.config import load_settings

    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_WINDOW__LENGTH_MS": str(STEP),
                           "ROLLCAST_MODEL__CONTEXT": str(L)})
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
    chunks = list(forecaster.forecast(keys, issued_at=9, chunk=3))
    assert [len(c) for c in chunks] == [3, 3, 1]  # each series once, those with context only
    contexts = np.stack([windows.filter(pl.col("series") == n).sort("window_end")["last"].to_numpy()[-L:]
                         for n in names])
    grid = last - STEP * np.arange(L - 1, -1, -1)
    offline = models.predict(module, contexts, window_end_ms=np.broadcast_to(grid, contexts.shape))
    assert [m for c in chunks for m in c] == forecast_messages(names, [last] * 7, offline, model, STEP, issued_at=9)
    assert [m for c in forecaster.forecast(keys, issued_at=9, chunk=100) for m in c] == [
        m for c in chunks for m in c]


def test_a_batch_longer_than_the_buffer_is_forecast_before_the_store_holds_it(tmp_path: Path) -> None:
    """Ingest produces a checkpoint's windows before it writes them to the store: a batch with more
    windows of a series than the buffer holds (gap rows after a long silence, a lagging restart)
    takes the contexts of its older windows from the batch itself when the store has none yet."""
    from models.serving import Forecaster
    from pipeline.config import load_settings

    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_WINDOW__LENGTH_MS": str(STEP),
                           "ROLLCAST_MODEL__CONTEXT": str(L)})
    module = models.create_model("lstm", context=L, horizon=H, hidden=4)
    model = LoadedModel("lstm", "1", module, L, H, list(module.config.quantiles))
    forecaster = Forecaster(s, model)
    windows = make_windows(["a", "b"], 4 * forecaster.capacity)
    assert HistoryStore(s).count() == 0
    table = windows.to_arrow()
    keys = forecaster.add(table)
    got = {(m[0], json.loads(m[1])["last_window_end"])
           for c in forecaster.forecast(keys, issued_at=1, batch=[table]) for m in c}
    ends = windows.filter(pl.col("series") == "b")["window_end"].to_list()
    assert {("b", e) for e in ends[L - 1:]} <= got  # every window with a full context, none skipped
    # in "a" too, the context starting at its gap row included (the gap rule: it takes the first known value)
    assert len(got) == len(keys) - 2 * (L - 1)
    assert not list(forecaster.forecast(keys[:1], issued_at=1))  # without them, the empty store has no context


def test_a_partition_assigned_again_takes_what_another_consumer_read_meanwhile_from_the_store(
        tmp_path: Path) -> None:
    """A forecast process built its buffers from the store, then another consumer of the group read
    windows 10..19 of the series (they reached the store, not this process). When the partition is
    assigned here (moved, or kept through an eager rebalance) and window 20 arrives, its context comes
    from the store: the forecast equals offline inference over all windows. A process not told of the
    assignment has no context for it (what the job did before)."""
    from models.serving import Forecaster
    from pipeline.config import load_settings

    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_WINDOW__LENGTH_MS": str(STEP),
                           "ROLLCAST_MODEL__CONTEXT": str(L), "ROLLCAST_WINDOW__TARGET": "last"})
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
        got[f] = {m[0]: json.loads(m[1]) for c in f.forecast(keys, issued_at=1, batch=[table]) for m in c}
    assert got[unaware] == {}  # short contexts: the windows read elsewhere are missing
    assert sorted(got[here]) == ["a", "b"]
    last = int(latest["window_end"].max())
    contexts = np.stack([windows.filter(pl.col("series") == x)["last"].to_numpy()[-L:] for x in ("a", "b")])
    grid = last - STEP * np.arange(L - 1, -1, -1)
    offline = models.predict(module, contexts, window_end_ms=np.broadcast_to(grid, contexts.shape))
    want = {m[0]: json.loads(m[1]) for m in forecast_messages(["a", "b"], [last] * 2, offline, model, STEP, issued_at=1)}
    assert got[here] == want


class ScriptedConsumer:
    """A scripted consumer, not Kafka (see tests/conftest.py): stands in for the consumer in
    :func:`complete_batch`, which only polls and asks for the assignment. Each poll hands out the next
    scripted fetch, or, with none left, waits out its timeout and returns nothing, so a batch split
    across fetches happens at will."""

    def __init__(self, owned: set[int], fetches: list[dict]):
        self.owned, self.fetches, self.timeouts = owned, fetches, []

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("windows", p) for p in self.owned}

    def poll(self, timeout_ms: int) -> dict:
        self.timeouts.append(timeout_ms)
        if self.fetches:
            return self.fetches.pop(0)
        time.sleep(timeout_ms / 1000)
        return {}


def _batch_records(series: list[str]) -> dict[TopicPartition, list[SimpleNamespace]]:
    """One windows batch as consumer records (only headers matter here), by partition."""
    out: dict[TopicPartition, list[SimpleNamespace]] = {}
    for p, value, headers in WindowRouter(4).batch(make_windows(series, 1)):
        out.setdefault(TopicPartition("windows", p), []).append(SimpleNamespace(headers=headers, value=value))
    return out


def test_a_batch_split_across_fetches_is_completed_before_forecasting() -> None:
    parts = _batch_records([f"s{i}" for i in range(40)])
    first, *rest = parts
    assert rest
    # the rest arrives two polls later: the job waits for it
    consumer = ScriptedConsumer({0, 1, 2, 3}, [{}, {}, {tp: parts[tp] for tp in rest}])
    batch = {first: list(parts[first])}
    complete_batch(consumer, batch, wait_s=5)
    assert batch == parts and consumer.timeouts[0] == 0 and len(consumer.timeouts) == 3
    # a whole batch: one look at what is already fetched, no waiting
    consumer = ScriptedConsumer({0, 1, 2, 3}, [])
    batch = {tp: list(records) for tp, records in parts.items()}
    complete_batch(consumer, batch, wait_s=5)
    assert batch == parts and consumer.timeouts == [0]
    # partitions owned by another consumer are not waited for
    consumer = ScriptedConsumer({first.partition}, [])
    complete_batch(consumer, {first: list(parts[first])}, wait_s=5)
    assert consumer.timeouts == [0]


def test_a_batch_whose_rest_never_comes_is_forecast_after_the_wait() -> None:
    parts = _batch_records([f"s{i}" for i in range(40)])
    first = next(iter(parts))
    consumer = ScriptedConsumer({0, 1, 2, 3}, [])
    batch = {first: list(parts[first])}
    t0 = time.monotonic()
    complete_batch(consumer, batch, wait_s=0.2)
    assert 0.2 <= time.monotonic() - t0 < 2
    assert batch == {first: parts[first]}
    # batch_wait_ms = 0: what is fetched now, no wait
    consumer = ScriptedConsumer({0, 1, 2, 3}, [])
    complete_batch(consumer, {first: list(parts[first])}, wait_s=0)
    assert consumer.timeouts == [0]


# ----------------------------------------------------------------------------- helpers


def make_windows(series: list[str], n: int, start_ms: int = 1_700_000_000_000) -> pl.DataFrame:
    """A regular grid of windows per series (one gap row with count = 0 in the first series)."""
    rows = []
    for k, s in enumerate(series):
        for i in range(n):
            ws = start_ms + i * STEP
            v = 10 * (k + 1) + np.sin(i / 3) * (k + 1)
            gap = k == 0 and i == n // 2
            rows.append({
                "series": s, "window_start": ws, "window_end": ws + STEP, "count": 0 if gap else 3,
                "first": None if gap else v, "last": None if gap else v, "min": None if gap else v - 1,
                "max": None if gap else v + 1, "mean": None if gap else v, "sum": None if gap else 3 * v,
            })
    return pl.DataFrame(rows, schema=WINDOW_SCHEMA)


def offline(model_dir: Path, windows: pl.DataFrame) -> dict[tuple[str, int], list[float]]:
    """Median forecasts computed independently: all windows in memory, models.predict per window."""
    model = models.load_model(model_dir)
    out = {}
    for (s,), part in windows.sort("window_start").group_by("series", maintain_order=True):
        vals = part["mean"].to_numpy().astype(float)
        ends = part["window_end"].to_numpy()
        for i in range(L - 1, part.height):
            ctx = vals[i - L + 1 : i + 1]
            if np.isnan(ctx[0]):
                continue
            p = models.predict(model, ctx[None], window_end_ms=ends[i - L + 1 : i + 1][None])
            out[(s, int(ends[i]))] = p[0, :, 1].tolist()
    return out


def produce_windows(settings: Settings, windows: pl.DataFrame) -> None:
    producer = make_producer(settings)
    router = WindowRouter(settings.kafka.partitions, max_rows=7)
    for partition, value, headers in router.batch(windows):  # as ingest's checkpoint does
        producer.send(settings.topics.windows, value, partition=partition, headers=headers)
    producer.flush()
    producer.close()


def collect_forecasts(settings: Settings, expected: set[tuple[str, int]], timeout: float) -> dict:
    """All forecast messages until every expected (series, last_window_end) is seen."""
    consumer = make_consumer(settings, None)
    from kafka import TopicPartition

    tps = [TopicPartition(settings.topics.forecasts, p)
           for p in consumer.partitions_for_topic(settings.topics.forecasts)]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    seen: dict[tuple[str, int], list[dict]] = {}

    def done() -> bool:
        for records in consumer.poll(timeout_ms=300).values():
            for rec in records:
                msg = json.loads(rec.value)
                assert rec.key.decode() == msg["series"]
                seen.setdefault((msg["series"], msg["last_window_end"]), []).append(msg)
        return expected <= seen.keys()

    try:
        try:
            wait_for(done, timeout, f"forecasts for {len(expected)} windows")
        except AssertionError as e:
            raise AssertionError(f"{e}; missing {sorted(expected - seen.keys())[:10]}") from None
    finally:
        consumer.close()
    return seen


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = models.create_model("tcn", context=L, horizon=H, seed=3)
    return models.save_model(model, tmp_path / "model")


# ----------------------------------------------------------------------------- against the broker


@pytest.mark.slow
def test_forecasts_equal_offline_inference_and_survive_kill_9(
    settings: Settings, test_env: dict[str, str], model_dir: Path, tmp_path: Path
) -> None:
    series = ["a", "b", "c"]
    windows = make_windows(series, 40)
    stored = windows.filter(pl.col("window_start") < windows["window_start"].min() + 12 * STEP)
    live = windows.join(stored, on=["series", "window_start"], how="anti")
    HistoryStore(settings).write_checkpoint("seed", 0, stored, Progress(0, None))
    env = {**test_env, "ROLLCAST_WINDOW__LENGTH_MS": str(STEP), "ROLLCAST_MODEL__CONTEXT": str(L)}

    proc = start_rollcast("forecast", "--model-dir", str(model_dir), env=env, log=tmp_path / "f1.log")
    first, second = live.filter(pl.col("window_start") < live["window_start"].min() + 10 * STEP), None
    second = live.join(first, on=["series", "window_start"], how="anti")
    store = HistoryStore(settings)
    try:
        store.write_checkpoint("seed", 0, first, Progress(1, None))  # as ingest: store, then produce
        produce_windows(settings, first)
        expected_first = {(s, e) for s, e in first.select("series", "window_end").iter_rows()}
        collect_forecasts(settings, expected_first, 60)
        store.write_checkpoint("seed", 0, second, Progress(2, None))
        produce_windows(settings, second)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: some of `second` may be unforecast
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()

    proc = start_rollcast("forecast", "--model-dir", str(model_dir), "--exit-when-idle", "3",
                          env=env, log=tmp_path / "f2.log")
    try:
        ref = offline(model_dir, windows)
        expected = {k for k in ref if k[1] > stored["window_end"].max()}
        seen = collect_forecasts(settings, expected, 60)
        assert proc.wait(60) == 0, (tmp_path / "f2.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    for key in expected:
        for msg in seen[key]:  # repeats after the restart carry the same values
            got = [p["mean"] for p in msg["points"]]
            np.testing.assert_allclose(got, ref[key], rtol=1e-5, atol=1e-5)
            assert msg["model"]["version"] == "local" and msg["step_ms"] == STEP
            assert msg["points"][0]["ts"] == key[1]
    gap_series_skips = {k for k in ref if k[0] == "a"}
    assert gap_series_skips  # the gap row is forward-filled, so "a" is forecast too


@pytest.mark.slow
def test_an_independent_kafka_client_reads_forecasts_as_json(
    settings: Settings, test_env: dict[str, str], model_dir: Path, tmp_path: Path
) -> None:
    """aiokafka (its own implementation of the Kafka protocol, not kafka-python) reads the topic.

    Debian's kcat was the first choice, but its librdkafka cannot parse this tansu build's
    ApiVersions v3 response ("Read underflow"), so it cannot talk to the test broker at all.
    """
    windows = make_windows(["x"], L + 2)
    env = {**test_env, "ROLLCAST_WINDOW__LENGTH_MS": str(STEP)}
    proc = start_rollcast("forecast", "--model-dir", str(model_dir), "--exit-when-idle", "3",
                          env=env, log=tmp_path / "f.log")
    try:
        produce_windows(settings, windows)
        collect_forecasts(settings, {("x", int(windows["window_end"].max()))}, 60)
    finally:
        proc.terminate()
        proc.wait(30)

    async def read(n: int) -> list:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(settings.topics.forecasts, bootstrap_servers=settings.kafka.bootstrap_servers,
                                    auto_offset_reset="earliest", group_id=None)
        await consumer.start()
        try:
            return [await asyncio.wait_for(consumer.getone(), 30) for _ in range(n)]
        finally:
            await consumer.stop()

    records = asyncio.run(read(3))  # windows L, L+1, L+2 have a full context
    for rec in records:
        msg = json.loads(rec.value)
        assert rec.key.decode() == msg["series"] == "x"
        assert set(msg) == {"series", "issued_at", "last_window_end", "model", "step_ms", "points"}
        assert len(msg["points"]) == H and set(msg["points"][0]["quantiles"]) == {"0.1", "0.5", "0.9"}
    assert sorted(json.loads(r.value)["last_window_end"] for r in records) == windows["window_end"].to_list()[-3:]


@pytest.mark.slow
def test_query_prints_the_latest_forecast(settings: Settings, test_env: dict[str, str], model_dir: Path,
                                          tmp_path: Path) -> None:
    windows = make_windows(["q1", "q2"], L + 3)
    HistoryStore(settings).write_checkpoint("seed", 0, windows, Progress(1, None))
    env = {**test_env, "ROLLCAST_WINDOW__LENGTH_MS": str(STEP)}
    proc = start_rollcast("forecast", "--model-dir", str(model_dir), "--exit-when-idle", "3",
                          env=env, log=tmp_path / "f.log")
    last = int(windows["window_end"].max())
    try:
        produce_windows(settings, windows)
        collect_forecasts(settings, {("q1", last), ("q2", last)}, 60)
    finally:
        proc.terminate()
        proc.wait(30)
    ref = offline(model_dir, windows)

    r = rollcast("query", "q1", "q2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    msgs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [m["series"] for m in msgs] == ["q1", "q2"]
    for m in msgs:
        assert m["last_window_end"] == last  # the newest, not the first one read
        np.testing.assert_allclose([p["mean"] for p in m["points"]], ref[(m["series"], last)], rtol=1e-5)

    r = rollcast("query", "q1", "nope", "--plot", str(tmp_path / "plot.png"), env=env)
    png = tmp_path / "plot-q1.png"  # one file per series when several are asked for
    assert r.returncode == 0, r.stderr
    assert "q1 — model tcn vlocal" in r.stdout and "nope: no forecast yet" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    r = rollcast("query", "nope", env=env)
    assert r.returncode == 1 and "no forecast yet" in r.stdout


@pytest.mark.slow
def test_a_new_champion_is_picked_up_without_restart(
    settings: Settings, test_env: dict[str, str], mlflow_server: str, tmp_path: Path
) -> None:
    from models.cycle import run_cycle
    from tests.jobs.train_helpers import HOUR_MS, WEAK, drifting_daily_windows, train_env, write_windows

    env = {**train_env(mlflow_server, Path(test_env["ROLLCAST_DATA_DIR"]), **WEAK), **test_env,
           "ROLLCAST_FORECAST__CHAMPION_POLL_S": "1"}
    env.pop("ROLLCAST_KAFKA__CLIENT")  # WEAK's SASL user is for redaction tests; the broker has no SASL
    from pipeline.config import load_settings

    s = load_settings(env=env)
    windows = drifting_daily_windows(820)
    t_live = int(windows["window_start"].min()) + 800 * HOUR_MS
    # gaps in the first live context of sensor-1 (L = 48 windows): its first window, one inside, and the
    # live window itself
    gaps = (pl.col("series") == "sensor-1") & pl.col("window_start").is_in(
        [t_live - 47 * HOUR_MS, t_live - 5 * HOUR_MS, t_live])
    aggregates = ["first", "last", "min", "max", "mean", "sum"]
    windows = windows.with_columns(
        pl.when(gaps).then(0).otherwise(pl.col("count")).alias("count"),
        *(pl.when(gaps).then(None).otherwise(pl.col(c)).alias(c) for c in aggregates),
    )
    write_windows(s, windows.filter(pl.col("window_start") < t_live))
    first = run_cycle(s)
    assert first.promoted == "1"

    proc = start_rollcast("forecast", env=env, log=tmp_path / "forecast.log")
    try:
        def send(hour: int) -> set[tuple[str, int]]:
            w = windows.filter(pl.col("window_start") == t_live + hour * HOUR_MS)
            write_windows(s, w)  # as ingest does: store first, then the topic
            produce_windows(s, w)
            return {(a, e) for a, e in w.select("series", "window_end").iter_rows()}

        seen = collect_forecasts(s, send(0), 120)
        assert {m["model"]["version"] for msgs in seen.values() for m in msgs} == {"1"}
        # one gap rule: the champion loaded through MLflow's pyfunc forecasts the same windows, gaps
        # included, exactly as the live job did
        import mlflow

        L = s.model.context
        recent = windows.filter(pl.col("window_start") <= t_live).sort("series", "window_start") \
            .group_by("series", maintain_order=True).tail(L)
        frame = recent.select("series", "window_end", pl.when(pl.col("count") > 0).then(pl.col("mean"))
                              .otherwise(float("nan")).alias("value")).to_pandas()
        assert frame["value"].isna().sum() == 3  # the three gaps are in the context
        mlflow.set_tracking_uri(mlflow_server)
        offline = mlflow.pyfunc.load_model(f"models:/{s.mlflow.registered_model}@champion").predict(frame)
        for name, rows in offline.groupby("series"):
            (live,) = seen[(name, t_live + HOUR_MS)]
            np.testing.assert_allclose([p["mean"] for p in live["points"]], rows["mean"], rtol=1e-5, atol=1e-6)
            for q in ("0.1", "0.9"):
                np.testing.assert_allclose([p["quantiles"][q] for p in live["points"]], rows[f"q{q}"],
                                           rtol=1e-5, atol=1e-6)
        assert set(offline["series"]) == {"sensor-0", "sensor-1", "sensor-2"}

        second = run_cycle(s.replace(**{"model.types": ["tcn"], "model.max_epochs": 3}))
        assert second.promoted == "2", second.candidates[0].decision

        def version_two_served() -> bool:
            keys = send(version_two_served.hour)
            version_two_served.hour += 1
            got = collect_forecasts(s, keys, 60)
            return all(m["model"]["version"] == "2" for k in keys for m in got[k])

        version_two_served.hour = 1
        wait_for(version_two_served, 90, "forecasts from version 2", interval=0.5)
        assert proc.poll() is None  # the same process, never restarted
        assert "champion moved" in (tmp_path / "forecast.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_a_malformed_windows_message_is_skipped_not_fatal(
    settings: Settings, test_env: dict[str, str], model_dir: Path, tmp_path: Path
) -> None:
    windows = make_windows(["m"], L + 1)
    env = {**test_env, "ROLLCAST_WINDOW__LENGTH_MS": str(STEP)}
    proc = start_rollcast("forecast", "--model-dir", str(model_dir), env=env, log=tmp_path / "f.log")
    try:
        producer = make_producer(settings)
        producer.send(settings.topics.windows, b"not arrow at all", partition=0, headers=HEADERS).get(30)
        producer.close()
        produce_windows(settings, windows)
        collect_forecasts(settings, {("m", int(windows["window_end"].max()))}, 60)
        assert proc.poll() is None
        assert "skipping an undecodable message" in (tmp_path / "f.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_freeze_heap_exempts_the_objects_alive_at_start_from_collection() -> None:
    import gc

    from pipeline.runtime import freeze_heap

    try:
        frozen = freeze_heap()
        # this process's imports (torch, polars, ...); the count only falls later, as frozen objects
        # are freed (a daemon thread of an earlier test dropping its last references)
        assert 10_000 < gc.get_freeze_count() <= frozen
        assert len(gc.get_objects()) < frozen / 10  # a full collection now walks only what came later
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
