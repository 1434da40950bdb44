"""Training at scale against a real MLflow server: warm starts and their lineage, full_every, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from models import tracking
from models.train.cycle import run_cycle
from pipeline.config import load_settings
from tests.support import rollcast
from tests.support.train import WEAK, drifting_daily_windows, train_env, train_settings, write_windows


@pytest.mark.slow
def test_warm_cycles_fine_tune_the_champion_and_every_full_every_th_cycle_retrains(
        mlflow_server: str, tmp_path: Path) -> None:
    s = train_settings(mlflow_server, tmp_path / "data", **{**WEAK, "ROLLCAST_TRAIN__FULL_EVERY": "3",
                                                          "ROLLCAST_TRAIN__WARM_EPOCHS": "1",
                                                          "ROLLCAST_TRAIN__HOLDOUT_SERIES": "2"})
    write_windows(s, drifting_daily_windows(800))
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)

    def tags(version: str) -> dict[str, str]:
        return client.get_model_version(s.mlflow.registered_model, version).tags

    first = run_cycle(s)
    assert first.promoted == "1" and first.candidates[0].cycle_kind == "full"
    scored = first.candidates[0].backtest.series  # a seeded subsample of 2 of the 3 series
    assert len(scored) == 2 and set(scored) < {"sensor-0", "sensor-1", "sensor-2"}
    assert tags("1")[tracking.CYCLE_KIND_TAG] == "full" and tracking.PARENT_VERSION_TAG not in tags("1")
    assert tags("1")[tracking.WARM_CYCLES_TAG] == "0"

    second = run_cycle(s)  # same type and config: fine-tunes the champion
    (c2,) = second.candidates
    assert c2.cycle_kind == "warm" and c2.parent_version == "1" and c2.version == "2"
    v2 = tags("2")
    assert v2[tracking.CYCLE_KIND_TAG] == "warm" and v2[tracking.PARENT_VERSION_TAG] == "1"
    assert v2[tracking.WARM_CYCLES_TAG] == "1"
    run = client.get_run(c2.run_id)
    assert run.data.tags[tracking.CYCLE_KIND_TAG] == "warm" and run.data.tags[tracking.PARENT_VERSION_TAG] == "1"
    assert run.data.params["train.warm_learning_rate"] == str(s.train.warm_learning_rate)
    assert "champion_holdout_mae" in c2.metrics  # judged by the same gate on the same holdout
    assert c2.backtest.series == scored  # the same series as the first cycle (and as the champion, this cycle)
    assert len(c2.train_loss) == 1  # train.warm_epochs
    parent = second.promoted or "1"

    third = run_cycle(s)  # the newest version is warm cycle 1 of at most 2 in a row: warm again
    (c3,) = third.candidates
    assert c3.cycle_kind == "warm" and c3.parent_version == parent and tags(c3.version)[tracking.WARM_CYCLES_TAG] == "2"

    fourth = run_cycle(s)  # the third cycle since the full one: from scratch
    (c4,) = fourth.candidates
    assert c4.cycle_kind == "full" and c4.parent_version is None
    assert tags(c4.version)[tracking.CYCLE_KIND_TAG] == "full" and tags(c4.version)[tracking.WARM_CYCLES_TAG] == "0"

    changed = run_cycle(s.replace(**{"model.params": {"tcn": {"channels_hidden": 4, "dropout": 0.0}}}))
    assert changed.candidates[0].cycle_kind == "full"  # another config: never warm-started


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_registers_one_version_as_good_as_one_process(
        mlflow_server: str, tmp_path: Path) -> None:
    """`rollcast train --once` with strategy ddp on 2 CPU processes (gloo), Lightning relaunching the command
    for rank 1; against the same cycle in one process.

    Each rank gets every other sample of the same seeded plan at half the batch size, and DDP averages the two
    halves' gradients, so every step sees the same global batch and, up to float summation order, the same
    gradient. The runs are still not bit-equal: the model's head starts at zero, so the first gradients of the
    layers below are ~0 and Adam, which divides each update by the gradient's running RMS, turns their
    rounding differences into full-size steps. They end as far apart as two seeds of one training (measured:
    3.6% apart in holdout MAE). Tolerance: 10% of the single-process holdout MAE, and the DDP model must beat
    seasonal naive by 10% (an untrained model forecasts exactly seasonal naive), so a DDP run that trained on
    one rank's half without syncing, or did not train, fails.
    """
    common = {**WEAK, "ROLLCAST_TRAIN__ACCELERATOR": "cpu", "ROLLCAST_MODEL__MAX_EPOCHS": "2"}
    single = train_env(mlflow_server, tmp_path / "single", **{**common, "ROLLCAST_MODEL__BATCH_SIZE": "128"})
    ddp = train_env(mlflow_server, tmp_path / "ddp", **{**common, "ROLLCAST_MODEL__BATCH_SIZE": "64",
                                                        "ROLLCAST_TRAIN__DEVICES": "2", "ROLLCAST_TRAIN__STRATEGY": "ddp"})
    maes, epochs = {}, {}
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    for name, env in (("ddp", ddp), ("single", single)):
        s = load_settings(env=env)
        write_windows(s, drifting_daily_windows(800))
        proc = rollcast("train", "--once", env=env, timeout=150)
        assert proc.returncode == 0, proc.stderr[-3000:]
        versions = client.search_model_versions(f"name='{s.mlflow.registered_model}'")
        assert len(versions) == 1, [v.version for v in versions]  # rank 1 registered nothing
        experiment = client.get_experiment_by_name(s.mlflow.experiment)
        assert len(client.search_runs([experiment.experiment_id])) == 1
        maes[name] = float(versions[0].tags["holdout_mae"])
        maes[f"{name}_seasonal_naive"] = float(versions[0].tags["seasonal_naive_holdout_mae"])
        epochs[name] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if " epoch " in ln]
        if name == "ddp":
            assert "rank 1 trained; rank 0 scores, logs and registers" in proc.stdout + proc.stderr
    print(json.dumps({"maes": maes, "epochs": epochs}, indent=1))
    assert maes["ddp"] == pytest.approx(maes["single"], rel=0.10), (maes, epochs)
    assert maes["ddp"] < 0.9 * maes["ddp_seasonal_naive"], maes
