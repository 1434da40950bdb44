"""`rollcast replay` against the real broker: every row arrives, mapped and keyed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipeline.config import Settings
from pipeline.datasets import ColumnMap, load_observations, resolve_dataset
from pipeline.errors import DatasetError
from pipeline.kafka.partitioning import partition_for
from pipeline.replay import parse_speed
from tests.support import read_topic, rollcast


def test_msft_with_column_mapping(settings: Settings, test_env: dict[str, str]) -> None:
    r = rollcast("replay", "msft_daily.csv", "--series-col", "symbol", "--ts-col", "date",
                 "--value-col", "close", "--limit", "300", "--no-progress", env=test_env)
    assert r.returncode == 0, r.stderr
    assert "replayed 300 observations" in r.stdout
    records = read_topic(settings, settings.topics.observations, 300, timeout=30)
    assert len(records) == 300
    first = min(records, key=lambda m: json.loads(m.value)["ts"])
    obs = json.loads(first.value)
    assert first.key == b"MSFT"
    assert obs == {"series": "MSFT", "ts": 511056000000, "value": 0.07533}  # 1986-03-13


def test_arrow_batches_and_configured_field_names(settings: Settings, test_env: dict[str, str]) -> None:
    env = {**test_env, "ROLLCAST_FIELDS__SERIES": "symbol", "ROLLCAST_FIELDS__TS": "time",
           "ROLLCAST_FIELDS__VALUE": "price"}
    r = rollcast("replay", "temperature_hourly.csv", "--format", "arrow", "--batch-rows", "400",
                 "--limit", "1000", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    expected = load_observations(resolve_dataset("temperature_hourly.csv"), ColumnMap()).head(1000)
    n_messages = sum(expected.slice(i, 400)["series"].map_elements(lambda s: partition_for(s, 2), pl.Int64)
                     .n_unique() for i in (0, 400, 800))
    records = read_topic(settings, settings.topics.observations, n_messages, timeout=30)
    assert all(dict(m.headers)["content-type"] == b"application/vnd.apache.arrow.stream" for m in records)
    tables = [pa.ipc.open_stream(io.BytesIO(m.value)).read_all() for m in records]
    assert sum(t.num_rows for t in tables) == 1000 and all(t.num_rows <= 400 for t in tables)
    assert tables[0].column_names == ["symbol", "time", "price"]
    for m, t in zip(records, tables, strict=True):  # a series stays on its key's partition
        assert {partition_for(s, 2) for s in t.column("symbol").to_pylist()} == {m.partition}
    got = pl.concat([pl.from_arrow(t) for t in tables]).rename({"symbol": "series", "time": "ts", "price": "value"})
    assert got.sort("ts", "series").equals(expected.sort("ts", "series"))


def test_speed_paces_by_event_time(settings: Settings, test_env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "ticks.csv"
    # 4 events, 1 s of event time apart; at speed 2 they take ~1.5 s of wall time
    f.write_text("symbol,time,price\nX,0,1.0\nX,1000,2.0\nX,2000,3.0\nX,3000,4.0\n")
    import time

    t0 = time.monotonic()
    r = rollcast("replay", str(f), "--series-col", "symbol", "--ts-col", "time", "--value-col", "price",
                 "--speed", "2", "--no-progress", env=test_env)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    records = read_topic(settings, settings.topics.observations, 4, timeout=30)
    stamps = sorted(m.timestamp for m in records)
    assert stamps[-1] - stamps[0] >= 1400  # broker append times follow the pacing
    assert elapsed >= 1.4


def test_bad_dataset_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        resolve_dataset("nope.csv")
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['ts', 'value', 'series'\]"):
        load_observations(f, ColumnMap())
    with pytest.raises(DatasetError, match="--speed"):
        parse_speed("fast")


def test_one_series_file_with_constant_series_name(tmp_path: Path) -> None:
    f = tmp_path / "one.csv"
    f.write_text("when,v\n2020-01-01T00:00:00Z,1.5\n2020-01-01,2.5\n")
    df = load_observations(f, ColumnMap(ts="when", value="v", constant_series="s1"))
    assert df.to_dicts() == [
        {"series": "s1", "ts": 1577836800000, "value": 1.5},
        {"series": "s1", "ts": 1577836800000, "value": 2.5},
    ]


def test_topics_command_creates_with_partitions(settings: Settings, test_env: dict[str, str]) -> None:
    env = {**test_env, "ROLLCAST_TOPICS__FORECASTS": test_env["ROLLCAST_TOPICS__FORECASTS"] + "-new"}
    r = rollcast("topics", "--partitions", "3", env=env)
    assert r.returncode == 0, r.stderr
    assert f"{env['ROLLCAST_TOPICS__FORECASTS']}: 3 partitions" in r.stdout
    assert f"{settings.topics.observations}: 2 partitions" in r.stdout  # existing topic left alone
