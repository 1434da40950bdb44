"""`rollcast up` and `rollcast demo` run real child processes and leave none behind."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.support import alive, descendants, rollcast, start_rollcast, wait_for

pytestmark = pytest.mark.slow


def _stack_json(data_dir: Path) -> dict | None:
    try:
        return json.loads((data_dir / "stack.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_up_then_sigterm_leaves_no_child_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    log = tmp_path / "up.log"
    proc = start_rollcast("up", env={"ROLLCAST_DATA_DIR": str(data)}, log=log)
    try:
        info = wait_for(lambda: "Press Ctrl-C" in log.read_text() and _stack_json(data), 180, "the stack to be up")
        kids = descendants(proc.pid)
        names = " ".join(Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in kids if alive(p))
        assert "tansu" in names and "mlflow" in names
        assert info["bootstrap_servers"].startswith("127.0.0.1:")
        assert "MLflow UI" in log.read_text() and info["tracking_uri"] in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        left = [p for p in kids if alive(p)]
        assert left == [], f"processes left behind: {left}"
        assert not (data / "stack.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_uses_configured_broker_and_mlflow(broker: str, mlflow_server: str, tmp_path: Path) -> None:
    env = {"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": broker,
           "ROLLCAST_MLFLOW__TRACKING_URI": mlflow_server}
    proc = start_rollcast("up", "--no-jobs", env=env)
    try:
        wait_for(lambda: _stack_json(tmp_path), 60, "stack.json")
        cmdlines = [Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in descendants(proc.pid)]
        assert not any("tansu" in c or "mlflow" in c for c in cmdlines)
        assert _stack_json(tmp_path)["bootstrap_servers"] == broker
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert broker in out.decode() and mlflow_server in out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_demo_runs_the_whole_pipeline_and_exits_by_itself(tmp_path: Path) -> None:
    env = {"ROLLCAST_DATA_DIR": str(tmp_path / "d"), "ROLLCAST_MODEL__MAX_EPOCHS": "2",
           "ROLLCAST_WINDOW__IDLE_TIMEOUT_S": "3", "ROLLCAST_TRAIN__EVERY_MINUTES": "600"}
    r = rollcast("demo", "--exit-after-replay", "--limit", "12000", env=env, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "replaying 11400 observations of 2 series" in out
    assert "ingest has written" in out
    assert "champion -> version 1" in out
    # query tables for both series, from the champion, after the live replay: version 1 (the scheduled train
    # job, started after `train --once`, goes on from that cycle instead of training again at its start)
    assert "demand — model tcn v1," in out and "temperature — model tcn v1," in out, out
    assert "MLflow UI" in out
    assert not (tmp_path / "d" / "stack.json").exists()
    stray = [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if alive(p)
             and str(tmp_path) in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert stray == []
    assert "live accuracy of the served forecasts" in out and "all series" in out, out[-3000:]

    # again in the same directory, as people do: the new in-memory broker starts at offset 0, so the
    # previous run's store (whose progress records count the old broker's offsets) is set aside, and
    # every observation replayed is windowed, forecast and scored as the first time
    again = rollcast("demo", "--exit-after-replay", "--limit", "12000", env=env, timeout=900)
    out = again.stdout
    assert again.returncode == 0, out[-3000:] + again.stderr[-3000:]
    assert "the previous run's history store moved to" in again.stderr + out
    assert "ingest has written" in out
    assert re.search(r"demand — model tcn v\d+,", out) and re.search(r"temperature — model tcn v\d+,", out), out
    assert "live accuracy of the served forecasts" in out and "all series" in out, out[-3000:]
    assert len(list((tmp_path / "d" / "previous").iterdir())) == 1
