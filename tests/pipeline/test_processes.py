"""What the embedded stack gives its jobs (pipeline.processes.embedded_env): pure settings logic."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_settings
from pipeline.processes import EMBEDDED_FETCH_MAX_WAIT_MS, embedded_env


def test_the_forecast_job_fetches_promptly_from_the_embedded_broker_unless_told_otherwise(tmp_path: Path) -> None:
    default = load_settings(env={})
    assert embedded_env(default, "forecast") == {"ROLLCAST_KAFKA__FETCH_MAX_WAIT_MS": str(EMBEDDED_FETCH_MAX_WAIT_MS)}
    assert load_settings(env=embedded_env(default, "forecast")).kafka.fetch_max_wait_ms == EMBEDDED_FETCH_MAX_WAIT_MS
    for job in ("ingest", "train", ""):  # idle consumers fetching every few ms would cost a core's quarter each
        assert embedded_env(default, job) == {}
    # a wait the user set, in the environment or the config file, is kept
    assert embedded_env(load_settings(env={"ROLLCAST_KAFKA__FETCH_MAX_WAIT_MS": "100"}), "forecast") == {}
    config = tmp_path / "rollcast.toml"
    config.write_text("[kafka]\nfetch_max_wait_ms = 250\n")
    assert embedded_env(load_settings(config, env={}), "forecast") == {}
