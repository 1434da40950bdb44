"""The MLflow UI shows what the train job registered and logged: a real headless Chromium renders the SPA.

Needs Debian's chromium at /usr/bin/chromium (`make test` installs it when run
as root). The screenshots are kept under test-artifacts/ for people to look at.
"""

from __future__ import annotations

import html
import re
import subprocess
from pathlib import Path

import pytest

from models.train.cycle import run_cycle
from tests.support import REPO
from tests.support.train import WEAK, drifting_daily_windows, train_settings, write_windows

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium: apt-get install -y chromium (or `make browser`)",
    ),
]


def chromium(url: str, profile: Path, *mode: str, budget_ms: int = 20_000) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``url`` with ``mode`` (--dump-dom or --screenshot=FILE)."""
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
         "--window-size=1400,900", *mode, url],
        capture_output=True, text=True, timeout=120,
    )


def rendered_text(url: str, profile: Path, waiting_for: str) -> str:
    """The page's visible text; a second look when ``waiting_for`` is not there yet (a cold server can
    answer the SPA's API calls slowly)."""
    for _ in range(2):
        proc = chromium(url, profile, "--dump-dom")
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = visible_text(proc.stdout)
        if waiting_for in text:
            break
    return text


def screenshot(url: str, profile: Path, name: str) -> None:
    """A PNG of the page under test-artifacts/, for people to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    proc = chromium(url, profile, f"--screenshot={shot}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def test_registered_model_and_champion_render_in_the_mlflow_ui(mlflow_server: str, tmp_path: Path) -> None:
    s = train_settings(mlflow_server, tmp_path / "data", **WEAK)
    write_windows(s, drifting_daily_windows(800))
    result = run_cycle(s)
    assert result.promoted == "1"
    name, alias = s.mlflow.registered_model, s.mlflow.champion_alias
    url = f"{mlflow_server}/#/models/{name}"

    text = rendered_text(url, tmp_path / "profile", "Version 1")
    assert name in text
    assert "Version 1" in text
    assert re.search(rf"@\s*{alias}", text), text[:2000]
    screenshot(url, tmp_path / "profile2", "mlflow_ui_registered_model.png")


def test_the_experiment_opens_on_its_training_runs_not_the_genai_overview(mlflow_server: str, tmp_path: Path) -> None:
    """An experiment created before (untagged, as by an older rollcast) gets ``mlflow.experimentKind``
    from the first cycle (MLflow 3.1-3.16 open it on its runs from that tag), and the link rollcast
    prints (``tracking.experiment_url``: the train job after a cycle, the demo) opens it in MLflow 3.17's
    UI on the runs table (a run per model of the cycle) instead of the GenAI overview (traces, tokens),
    which 3.17 shows by default whatever the tag says."""
    from mlflow import MlflowClient

    from models import tracking

    s = train_settings(mlflow_server, tmp_path / "data", **WEAK)
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(s.mlflow.experiment)
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags
    write_windows(s, drifting_daily_windows(800))
    result = run_cycle(s)
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    run_name = f"tcn-{result.cycle_id}"
    url = tracking.experiment_url(s)
    assert url.startswith(f"{mlflow_server}/#/experiments/{experiment_id}?")

    text = rendered_text(url, tmp_path / "profile", run_name)
    assert run_name in text, text[:2000]  # the runs table
    assert s.mlflow.experiment in text
    for genai in ("Tokens per Request", "Input tokens", "Output tokens"):
        assert genai not in text, text[:2000]
    screenshot(url, tmp_path / "profile2", "mlflow_ui_experiment_runs.png")
