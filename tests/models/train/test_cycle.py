"""One training cycle: the pure parts (holdout series, the full-or-warm plan, the split of the span), then
two real cycles on a tiny history store against the real MLflow server: versions, tags, the champion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

import models
from models import tracking
from models.registry import config_from_settings
from models.tracking.tags import (
    CHAMPION_HOLDOUT_MAE,
    CYCLE_FULL,
    CYCLE_KIND_TAG,
    CYCLE_TAG,
    CYCLE_WARM,
    DATA_END_MS_TAG,
    DATA_START_MS_TAG,
    HOLDOUT_REL_MAE,
    MODEL_TYPE_TAG,
    PARENT_VERSION_TAG,
    PROMOTION_TAG,
    RUN_CYCLE_TAG,
    SEASONAL_NAIVE_HOLDOUT_MAE,
    TRIGGER_REASON_TAG,
    TRIGGER_TAG,
    TRIGGER_WINDOWS,
    VALIDATION_TAG,
    WARM_CYCLES_TAG,
)
from models.train.cycle import (
    Champion,
    Plan,
    holdout_rows,
    plan_cycle,
    prepare_data,
    run_cycle,
    training_sets,
)
from models.train.selection import TIE_TOLERANCE
from pipeline.config import Settings
from pipeline.errors import ConfigError, NotEnoughData
from tests.support.train import HOUR_MS, WEAK, drifting_daily_windows, train_settings, write_windows


def tcn(s: Settings, **overrides) -> models.ForecastModel:
    return models.create_model("tcn", **config_from_settings(s.model, "tcn", **overrides))


def test_the_holdout_is_every_series_or_a_seeded_sorted_subsample() -> None:
    assert holdout_rows(5, 10, seed=0).tolist() == [0, 1, 2, 3, 4]
    picked = holdout_rows(100, 10, seed=7)
    assert len(picked) == len(set(picked.tolist())) == 10 and (np.diff(picked) > 0).all()
    assert picked.tolist() == holdout_rows(100, 10, seed=7).tolist()  # the same series every cycle
    assert picked.tolist() != holdout_rows(100, 10, seed=8).tolist()


def test_a_cycle_fine_tunes_the_champion_only_when_nothing_changed_and_not_every_time(tmp_path: Path) -> None:
    s = train_settings("http://127.0.0.1:1", tmp_path, ROLLCAST_TRAIN__FULL_EVERY="3")
    model = tcn(s)
    champion = Champion("5", tcn(s), "tcn")
    assert plan_cycle(s, "tcn", model, None, None) == Plan(CYCLE_FULL)
    assert plan_cycle(s, "lstm", model, champion, None) == Plan(CYCLE_FULL)  # another type
    assert plan_cycle(s, "tcn", model, Champion("5", tcn(s, context=36), "tcn"), None) == Plan(CYCLE_FULL)
    assert plan_cycle(s, "tcn", model, champion, None) == Plan(CYCLE_WARM, "5", 1)
    after_full = {CYCLE_KIND_TAG: CYCLE_FULL, WARM_CYCLES_TAG: "0"}
    assert plan_cycle(s, "tcn", model, champion, after_full) == Plan(CYCLE_WARM, "5", 1)
    after_warm = {CYCLE_KIND_TAG: CYCLE_WARM, WARM_CYCLES_TAG: "1"}
    assert plan_cycle(s, "tcn", model, champion, after_warm) == Plan(CYCLE_WARM, "5", 2)
    # full_every = 3: two warm cycles in a row, then a full retrain
    assert plan_cycle(s, "tcn", model, champion, {**after_warm, WARM_CYCLES_TAG: "2"}) == Plan(CYCLE_FULL)
    never_warm = train_settings("http://127.0.0.1:1", tmp_path, ROLLCAST_TRAIN__FULL_EVERY="1")
    assert plan_cycle(never_warm, "tcn", model, champion, None) == Plan(CYCLE_FULL)


def test_the_span_is_split_by_time_and_too_little_history_says_what_is_needed(tmp_path: Path) -> None:
    s = train_settings("http://127.0.0.1:1", tmp_path, ROLLCAST_TRAIN__SPAN_WINDOWS="300",
                       ROLLCAST_TRAIN__WARM_SPAN_WINDOWS="50")
    with pytest.raises(NotEnoughData, match="is empty"):
        prepare_data(s)
    windows = drifting_daily_windows(400)
    write_windows(s, windows.filter(windows["window_start"] < windows["window_start"].min() + 100 * HOUR_MS))
    with pytest.raises(NotEnoughData, match="needs at least 120"):  # context 48 + holdout 48 + 2 horizons
        prepare_data(s)
    with pytest.raises(ConfigError, match="at least model.horizon"):
        prepare_data(s.replace(**{"train.holdout_windows": 6}))

    write_windows(s, windows.filter(windows["window_start"] >= windows["window_start"].min() + 100 * HOUR_MS))
    data = prepare_data(s)
    span = data.span
    assert span.series == 3 and span.end_ms == int(windows["window_end"].max())
    assert span.end_ms - span.start_ms == 300 * HOUR_MS and data.matrix.values.shape == (3, 300)
    assert span.holdout_windows == 48 and data.origins.tolist() == [252, 264, 276, 288]  # H apart, to the end
    assert data.train_span[1] <= data.val_span[0] and data.val_span[1] <= 252
    assert span.train_windows == data.train_span[1] - data.train_span[0]
    assert data.holdout.series == data.matrix.series

    model = tcn(s)
    full, _ = training_sets(s, data, model.config, Plan(CYCLE_FULL))
    warm, val = training_sets(s, data, model.config, Plan(CYCLE_WARM, "1", 1))
    assert full.span == data.train_span and val.span == data.val_span
    assert warm.span == (data.train_span[1] - 50, data.train_span[1])  # the newest windows only


def test_a_cycle_registers_a_tagged_version_and_moves_champion_only_past_the_gate(
    mlflow_server: str, tmp_path: Path
) -> None:
    s = train_settings(mlflow_server, tmp_path / "data", **WEAK)
    write_windows(s, drifting_daily_windows(800))
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    trigger = {TRIGGER_TAG: TRIGGER_WINDOWS, TRIGGER_REASON_TAG: "800 new windows"}

    first = run_cycle(s, trigger=trigger)
    (c1,) = first.candidates
    assert first.champion_before is None and c1.cycle_kind == CYCLE_FULL
    assert c1.mae < c1.metrics[SEASONAL_NAIVE_HOLDOUT_MAE] and CHAMPION_HOLDOUT_MAE not in c1.metrics
    assert first.promoted == c1.version == "1" and tracking.champion_version(s).version == "1"
    v1 = client.get_model_version(s.mlflow.registered_model, "1")
    assert v1.run_id == c1.run_id
    assert v1.tags[MODEL_TYPE_TAG] == "tcn" and v1.tags[CYCLE_TAG] == first.cycle_id
    assert v1.tags[VALIDATION_TAG] == "passed" and v1.tags[PROMOTION_TAG] == "promoted"
    assert v1.tags[DATA_START_MS_TAG] == str(first.span.start_ms) and v1.tags[DATA_END_MS_TAG] == str(first.span.end_ms)
    assert v1.tags[CYCLE_KIND_TAG] == CYCLE_FULL and v1.tags[WARM_CYCLES_TAG] == "0" and PARENT_VERSION_TAG not in v1.tags
    assert float(v1.tags[HOLDOUT_REL_MAE]) == pytest.approx(c1.mae / c1.metrics[SEASONAL_NAIVE_HOLDOUT_MAE], rel=1e-5)
    assert v1.tags[TRIGGER_TAG] == TRIGGER_WINDOWS and v1.tags[TRIGGER_REASON_TAG] == "800 new windows"
    run = client.get_run(c1.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[RUN_CYCLE_TAG] == first.cycle_id
    assert run.data.tags[TRIGGER_TAG] == TRIGGER_WINDOWS

    # The next cycle fine-tunes the champion and is judged against it on the same holdout.
    second = run_cycle(s)
    (c2,) = second.candidates
    assert second.champion_before == "1" and c2.version == "2"
    assert (c2.cycle_kind, c2.parent_version, c2.warm_cycles) == (CYCLE_WARM, "1", 1)
    assert c2.metrics[CHAMPION_HOLDOUT_MAE] == pytest.approx(c1.mae, rel=1e-6)  # the same origins and series
    v2 = client.get_model_version(s.mlflow.registered_model, "2")
    assert v2.tags[PARENT_VERSION_TAG] == "1" and v2.tags[CYCLE_KIND_TAG] == CYCLE_WARM
    assert TRIGGER_TAG not in v2.tags  # a cycle run without a trigger says nothing of one
    beats = c2.mae < c1.mae * (1 - TIE_TOLERANCE) and c2.mae < c2.metrics[SEASONAL_NAIVE_HOLDOUT_MAE]
    assert second.promoted == ("2" if beats else None)
    assert tracking.champion_version(s).version == ("2" if beats else "1")
    assert v2.tags[PROMOTION_TAG] == ("promoted" if beats else c2.decision) and (beats or "not promoted" in c2.decision)
