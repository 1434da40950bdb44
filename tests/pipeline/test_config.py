"""Settings: defaults, TOML file, environment overrides, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings, resolve_endpoints
from pipeline.errors import ConfigError


def test_defaults_build_without_any_source() -> None:
    s = load_settings(env={})
    assert s.topics.observations == "observations"
    assert s.topics.dlq == "observations.dlq"
    assert s.kafka.bootstrap_servers is None
    assert s.model.quantiles == [0.01, 0.1, 0.5, 0.9, 0.99]


def test_toml_then_env_override(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(
        '[kafka]\nbootstrap_servers = "a:9092"\n[kafka.client]\nsecurity_protocol = "SASL_SSL"\n'
        '[window]\nlength_ms = 60000\n[fields]\nseries = "symbol"\nts = "time"\nvalue = "price"\n'
    )
    s = load_settings(cfg, env={"ROLLCAST_WINDOW__LENGTH_MS": "1000", "ROLLCAST_MODEL__TYPES": '["lstm", "tcn"]'})
    assert s.kafka.bootstrap_servers == "a:9092"
    assert s.kafka.client == {"security_protocol": "SASL_SSL"}
    assert s.window.length_ms == 1000
    assert s.fields.series == "symbol"
    assert s.model.types == ["lstm", "tcn"]


def test_settings_are_immutable() -> None:
    s = load_settings(env={})
    with pytest.raises(Exception, match="frozen"):
        s.window.length_ms = 5  # type: ignore[misc]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[kafka]\nbootstrap_server = "typo"\n[window]\nlength_ms = "soon"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={"ROLLCAST_MODEL__QUANTILES": "[0.1, 0.9]", "ROLLCAST_NOPE": "1"})
    text = str(info.value)
    assert "kafka.bootstrap_server: unknown setting" in text
    assert "window.length_ms" in text
    assert "model.quantiles" in text and "0.5" in text
    assert "nope: unknown setting" in text
    assert len(info.value.problems) == 4


def test_missing_config_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})


def test_secrets_are_redacted() -> None:
    s = load_settings(env={"ROLLCAST_KAFKA__CLIENT__SASL_PLAIN_PASSWORD": "hunter2",
                           "ROLLCAST_KAFKA__CLIENT__SASL_PLAIN_USERNAME": "me"})
    assert s.kafka.client["sasl_plain_password"] == "hunter2"
    assert s.kafka.redacted_client() == {"sasl_plain_password": "***", "sasl_plain_username": "me"}


def test_replace_validates_again() -> None:
    s = load_settings(env={})
    assert s.replace(**{"window.length_ms": 10}).window.length_ms == 10
    with pytest.raises(ConfigError, match="window.length_ms"):
        s.replace(**{"window.length_ms": -1})


def test_stack_file_of_a_dead_up_is_ignored(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    (tmp_path / "stack.json").write_text('{"pid": 999999999, "bootstrap_servers": "x:1", "tracking_uri": "http://y"}')
    assert resolve_endpoints(s).kafka.bootstrap_servers is None
    import os

    (tmp_path / "stack.json").write_text(f'{{"pid": {os.getpid()}, "bootstrap_servers": "x:1", "tracking_uri": "http://y"}}')
    r = resolve_endpoints(s)
    assert (r.kafka.bootstrap_servers, r.mlflow.tracking_uri) == ("x:1", "http://y")


def test_history_location_defaults_to_the_data_dir_and_takes_a_uri(tmp_path: Path) -> None:
    s = load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path)})
    assert s.history_location == str(tmp_path / "history") and s.history_dir == tmp_path / "history"
    local = load_settings(env={"ROLLCAST_STORAGE__HISTORY": f"file://{tmp_path}/h%20x"})
    assert local.history_dir == tmp_path / "h x"
    remote = load_settings(env={"ROLLCAST_STORAGE__HISTORY": "s3://bucket/prefix?region=eu-west-1"})
    assert remote.history_location == "s3://bucket/prefix?region=eu-west-1"
    with pytest.raises(ConfigError, match="not a local directory"):
        _ = remote.history_dir


def test_window_targets_are_the_aggregates() -> None:
    from pipeline.aggregators import AGGREGATE_NAMES

    for target in AGGREGATE_NAMES:
        assert load_settings(env={"ROLLCAST_WINDOW__TARGET": target}).window.target == target
    with pytest.raises(ConfigError) as e:
        load_settings(env={"ROLLCAST_WINDOW__TARGET": "median"})
    assert e.value.problems == [
        "window.target: Input should be 'count', 'first', 'last', 'min', 'max', 'mean' or 'sum' (got \"median\")"
    ]


def test_the_anomaly_level_needs_its_quantiles() -> None:
    bad = {"ROLLCAST_MODEL__QUANTILES": "[0.1, 0.5, 0.9]"}
    with pytest.raises(ConfigError) as e:
        load_settings(env=bad)
    text = str(e.value)
    assert "anomalies.level 0.98 needs the quantiles 0.01 and 0.99" in text and "anomalies.enabled = false" in text
    assert load_settings(env={**bad, "ROLLCAST_ANOMALIES__ENABLED": "false"}).model.quantiles == [0.1, 0.5, 0.9]
    assert load_settings(env={**bad, "ROLLCAST_ANOMALIES__LEVEL": "0.8"}).anomalies.level == 0.8
    assert load_settings(env={**bad, "ROLLCAST_SCORING__ENABLED": "false"}).anomalies.enabled
