"""The train job against a real MLflow server and a real history store: runs, versions, champion."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import models
from models import tracking as registry
from models.compiled import ATOL, RTOL
from models.train.cycle import run_cycle
from models.train.selection import Candidate
from pipeline import processes
from pipeline.config import load_settings
from pipeline.errors import MlflowUnavailable, PromotionRefused
from pipeline.store import HistoryStore
from tests.support import rollcast, start_rollcast, wait_for
from tests.support.train import WEAK, drifting_daily_windows, train_env, train_settings, write_windows


def settings_for(uri: str, data_dir: Path, **extra: str):
    return train_settings(uri, data_dir, **{**WEAK, **extra})


def champion_of(s) -> str | None:
    found = registry.champion_version(s)
    return None if found is None else str(found.version)


@pytest.mark.slow
def test_cycles_log_runs_register_versions_and_gate_the_champion(mlflow_server: str, tmp_path: Path) -> None:
    s = settings_for(mlflow_server, tmp_path / "data")
    write_windows(s, drifting_daily_windows(800))
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    name = s.mlflow.registered_model

    # 1. First model: beats seasonal naive, so it becomes the champion.
    first = run_cycle(s)
    (c1,) = first.candidates
    assert c1.metrics["holdout_mae"] < c1.metrics["seasonal_naive_holdout_mae"]
    assert first.promoted == c1.version == "1" and champion_of(s) == "1"

    run = client.get_run(c1.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model_type"] == "tcn" and p["model.context"] == "48" and p["model.horizon"] == "12"
    assert p["model.channels_hidden"] == "8" and p["train.holdout_windows"] == "96"
    assert int(p["data_end_ms"]) - int(p["data_start_ms"]) == 800 * 3_600_000
    assert p["data_end"].endswith("Z") and p["data_series"] == "3"
    everything = " ".join([*p.values(), *run.data.tags.values()])
    assert "hunter2-secret" not in everything and "sasl" not in everything
    for key in ("holdout_mae", "holdout_rmse", "holdout_smape", "holdout_mase", "holdout_coverage",
                "seasonal_naive_holdout_mae", "holdout_rel_mae_seasonal_naive"):
        assert math.isfinite(run.data.metrics[key]), key
    assert "champion_holdout_mae" not in run.data.metrics  # there was no champion to score
    train_hist = client.get_metric_history(c1.run_id, "train_loss")
    assert [m.step for m in train_hist] == list(range(len(c1.train_loss))) == [0]
    assert [m.value for m in train_hist] == pytest.approx(c1.train_loss)
    assert len(client.get_metric_history(c1.run_id, "val_loss")) == 1
    plots = {a.path for a in client.list_artifacts(c1.run_id, "plots")}
    assert "plots/loss.png" in plots
    assert sum(path.startswith("plots/forecast_") and path.endswith(".png") for path in plots) == 3
    # the holdout's split-conformal offsets: with the version's model (the forecast job starts from them)
    # and as a run artifact, with the holdout coverage raw and calibrated (out of sample) as metrics
    for key in ("holdout_coverage_raw", "holdout_coverage_calibrated_second_half"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
    from models.serving.forecaster import load_holdout_offsets

    mlflow.set_tracking_uri(mlflow_server)

    model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{c1.run_id}/calibration", dst_path=str(tmp_path / "cal")))
    offsets = load_holdout_offsets(model_dir)
    assert offsets is not None and offsets.horizon == 12 and offsets.quantiles == s.model.quantiles
    assert offsets.pooled.shape == (12, len(s.model.quantiles)) and offsets.windows > 0
    assert offsets.coverage["raw"] == pytest.approx(run.data.metrics["holdout_coverage_raw"])

    v1 = client.get_model_version(name, "1")
    assert v1.run_id == c1.run_id
    assert v1.tags["validation_status"] == "passed" and v1.tags["model_type"] == "tcn"
    assert v1.tags["data_start_ms"] == p["data_start_ms"] and v1.tags["code_version"]
    assert float(v1.tags["holdout_mae"]) == pytest.approx(c1.mae, rel=1e-5)
    assert v1.tags["promotion"] == "promoted"

    # 2. Two better types in one cycle: both beat the champion, only the best moves the alias.
    second = run_cycle(s.replace(**{"model.types": ["tcn", "lstm"], "model.max_epochs": 3}))
    by_type = {c.model_type: c for c in second.candidates}
    assert all(c.mae < c1.mae for c in second.candidates)
    best = min(second.candidates, key=lambda c: c.mae)
    assert second.champion_before == "1" and second.promoted == best.version
    assert champion_of(s) == best.version
    loser = next(c for c in second.candidates if c is not best)
    assert client.get_model_version(name, loser.version).tags["promotion"].startswith("not promoted")
    assert client.get_run(by_type["tcn"].run_id).data.metrics["champion_holdout_mae"] == pytest.approx(c1.mae)

    # 3. A worse model (barely trained) is registered but does not move the alias.
    third = run_cycle(s.replace(**{"model.learning_rate": 1e-9}))
    (c3,) = third.candidates
    assert c3.mae > best.mae and third.promoted is None
    assert champion_of(s) == best.version
    assert client.get_model_version(name, c3.version).tags["promotion"].startswith("not promoted")

    # 4. A diverging model (SGD at lr 1e6, no clipping): NaN loss, failing tag, never promoted.
    diverging = {"tcn": {"channels_hidden": 8, "optimizer": "sgd", "learning_rate": 1e6, "grad_clip": 0.0}}
    fourth = run_cycle(s.replace(**{"model.params": diverging}))
    (c4,) = fourth.candidates
    assert c4.failure and "non-finite" in c4.failure and fourth.promoted is None
    v4 = client.get_model_version(name, c4.version)
    assert v4.tags["validation_status"] == "failed" and "non-finite" in v4.tags["validation_reason"]
    assert client.get_run(c4.run_id).data.tags["validation_status"] == "failed"
    assert champion_of(s) == best.version
    with pytest.raises(PromotionRefused, match="did not pass validation"):
        registry.promote(s, c4.version)
    assert champion_of(s) == best.version


@pytest.mark.slow
def test_pyfunc_champion_predicts_like_the_saved_model(mlflow_server: str, tmp_path: Path) -> None:
    s = settings_for(mlflow_server, tmp_path / "data")
    write_windows(s, drifting_daily_windows(800))
    result = run_cycle(s)
    assert result.promoted == "1"

    version, model_dir = registry.champion(s)
    assert version == "1" and (model_dir / "weights.pt").is_file() and (model_dir / "config.json").is_file()
    assert registry.champion(s) == (version, model_dir)  # cached: no second download

    L, H = s.model.context, s.model.horizon
    recent = HistoryStore(s).last_windows(L + 5)  # extra rows: the model uses the last L per series
    frame = pd.DataFrame({
        "series": recent["series"].to_list(),
        "window_end": recent["window_end"].to_numpy(),
        "value": recent["mean"].to_numpy(),
    })
    pyfunc = mlflow.pyfunc.load_model(f"models:/{s.mlflow.registered_model}@{s.mlflow.champion_alias}")
    out = pyfunc.predict(frame)
    qcols = [f"q{q:g}" for q in s.model.quantiles]  # the default: q0.01, q0.1, q0.5, q0.9, q0.99
    assert list(out.columns) == ["series", "step", "ts", "mean", *qcols]
    assert len(out) == 3 * H

    model = models.load_model(model_dir)
    tail = recent.group_by("series", maintain_order=True).tail(L)
    names = tail["series"].unique(maintain_order=True).to_list()
    ctx = tail["mean"].to_numpy().reshape(len(names), L)
    ends = tail["window_end"].to_numpy().reshape(len(names), L)
    expected = models.predict(model, ctx, window_end_ms=ends)  # (B, H, Q)
    got = out.sort_values(["series", "step"])
    # the pyfunc model runs the version's ONNX graph (models.compiled): equal to eager within its tolerance
    np.testing.assert_allclose(got[qcols].to_numpy().reshape(len(names), H, len(qcols)), expected,
                               rtol=RTOL, atol=ATOL)
    median = list(s.model.quantiles).index(0.5)
    np.testing.assert_allclose(got["mean"].to_numpy(), expected[:, :, median].reshape(-1), rtol=RTOL, atol=ATOL)
    assert got["series"].iloc[0] == names[0]
    assert (got.groupby("series")["ts"].min().to_numpy() == ends[:, -1]).all()  # step 1 starts at the last end
    assert (np.diff(got["ts"].to_numpy()[:H]) == s.window.length_ms).all()


@pytest.mark.slow
@pytest.mark.fault
def test_mlflow_down_mid_cycle_leaves_the_champion_and_the_next_cycle_succeeds(tmp_path: Path) -> None:
    port = processes.free_port()
    root = tmp_path / "mlflow"
    server = processes.start_mlflow(root, port, root / "logs", timeout_s=180)
    try:
        uri = f"http://127.0.0.1:{port}"
        s = settings_for(uri, tmp_path / "data", ROLLCAST_TRAIN__MAX_RETRIES="1",
                         ROLLCAST_TRAIN__RETRY_BACKOFF_S="0.2")
        write_windows(s, drifting_daily_windows(800))
        assert run_cycle(s).promoted == "1"

        def stop_mlflow(candidates: list[Candidate]) -> None:
            assert candidates  # trained and scored; nothing logged yet
            server.stop()

        with pytest.raises(MlflowUnavailable, match="gave up after 2 attempt"):
            run_cycle(s.replace(**{"model.max_epochs": 3}), on_trained=stop_mlflow)

        server = processes.start_mlflow(root, port, root / "logs", timeout_s=180)
        client = MlflowClient(uri, registry_uri=uri)
        versions = client.search_model_versions(f"name='{s.mlflow.registered_model}'")
        assert [v.version for v in versions] == ["1"]  # nothing half-registered
        assert champion_of(s) == "1"
        experiment = client.get_experiment_by_name(s.mlflow.experiment)
        runs = client.search_runs([experiment.experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"]

        third = run_cycle(s.replace(**{"model.max_epochs": 3}))
        assert third.champion_before == "1" and third.candidates[0].version == "2"
        assert third.promoted == "2" and champion_of(s) == "2"
    finally:
        server.stop()


def test_unreachable_mlflow_is_retried_with_backoff_then_reported(tmp_path: Path) -> None:
    s = settings_for(f"http://127.0.0.1:{processes.free_port()}", tmp_path / "data",
                     ROLLCAST_TRAIN__MAX_RETRIES="2", ROLLCAST_TRAIN__RETRY_BACKOFF_S="0.2")
    t0 = time.monotonic()
    with pytest.raises(MlflowUnavailable, match="gave up after 3 attempt"):
        run_cycle(s)
    assert time.monotonic() - t0 >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s


@pytest.mark.slow
def test_train_once_with_too_little_history_says_so(mlflow_server: str, tmp_path: Path) -> None:
    env = train_env(mlflow_server, tmp_path / "data")
    s = load_settings(env=env)
    write_windows(s, drifting_daily_windows(100))
    proc = rollcast("train", "--once", env=env)
    assert proc.returncode == 1, proc.stderr
    assert "rollcast train: error:" in proc.stderr and "training needs at least" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_job_runs_on_schedule_and_goes_on_after_a_restart(mlflow_server: str, tmp_path: Path) -> None:
    """Cycles at start, after 24 new windows, and after a restart only when the schedule says so: the
    last cycle recorded in MLflow (its version's time and data end) is where the schedule goes on from."""
    env = train_env(mlflow_server, tmp_path / "data", **WEAK)
    s = load_settings(env=env)
    write_windows(s, drifting_daily_windows(800))
    later = drifting_daily_windows(872)
    first = int(later["window_start"].min())
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)

    def versions() -> list[str]:
        try:
            return sorted(v.version for v in client.search_model_versions(f"name='{s.mlflow.registered_model}'"))
        except mlflow.exceptions.MlflowException:
            return []

    def add_windows(hours: int) -> None:  # 24 hours of every series from hour `hours`: 72 windows
        start = first + hours * 3_600_000
        write_windows(s, later.filter((later["window_start"] >= start) & (later["window_start"] < start + 24 * 3_600_000)))

    def start(name: str) -> tuple[object, Path]:
        log = tmp_path / f"{name}.log"
        return start_rollcast("train", "--every-minutes", "60", "--after-windows", "24", "--poll-s", "0.2",
                              env=env, log=log), log

    def stop(proc: object) -> None:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0

    proc, log = start("train-1")
    try:
        wait_for(lambda: versions() == ["1"], 120, "the start-up cycle to register version 1")
        assert "training cycle: start-up (no version yet)" in log.read_text()
        # 24 new windows reach the store: the next cycle runs without waiting an hour.
        add_windows(800)
        wait_for(lambda: versions() == ["1", "2"], 120, "a cycle after 24 new windows")
        stop(proc)
        assert "train job stopped" in log.read_text()
        # 24 windows arrive while the job is down: the restarted job trains at once
        add_windows(824)
        proc, log = start("train-2")
        wait_for(lambda: versions() == ["1", "2", "3"], 120, "a cycle at restart for the windows that came meanwhile")
        assert "training now: 72 new windows" in log.read_text()  # 24 hours of 3 series
        stop(proc)
        # nothing new, last cycle minutes ago: the restarted job waits for its schedule
        proc, log = start("train-3")
        wait_for(lambda: "next cycle in" in log.read_text(), 60, "the restarted job to go on from version 3")
        text = log.read_text()
        assert "last cycle: version 3 of" in text and "after 24 more windows" in text, text
        time.sleep(1.0)  # five polls of the schedule
        stop(proc)
        assert "training cycle" not in log.read_text() and versions() == ["1", "2", "3"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_during_training_abandons_the_cycle_and_exits_0(mlflow_server: str, tmp_path: Path) -> None:
    env = train_env(mlflow_server, tmp_path / "data", **{**WEAK, "ROLLCAST_MODEL__MAX_EPOCHS": "500",
                                                            "ROLLCAST_MODEL__PATIENCE": "500"})
    s = load_settings(env=env)
    write_windows(s, drifting_daily_windows(800))
    log = tmp_path / "train.log"
    proc = start_rollcast("train", "--once", env=env, log=log)
    try:
        wait_for(lambda: "training tcn" in log.read_text(), 120, "training to start")
        time.sleep(1.0)  # inside Lightning's epoch loop
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert "abandoned: asked to stop" in out
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    assert client.search_model_versions(f"name='{s.mlflow.registered_model}'") == []
