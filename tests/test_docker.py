"""docker/: no Docker engine here, so check what can be checked without one.

The compose file parses, every rollcast service's command parses with the real
CLI, its environment is a valid settings object, and the image runs as a
non-root user with the rollcast entry point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.cli import build_parser
from pipeline.config import load_settings

yaml = pytest.importorskip("yaml")
DOCKER = Path(__file__).resolve().parents[1] / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_the_production_services() -> None:
    services = _compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert services["postgres"]["image"].startswith("postgres")
    assert "postgresql://" in " ".join(services["mlflow"]["command"])
    assert "--serve-artifacts" in services["mlflow"]["command"]
    for job in ("ingest", "train", "forecast", "replay"):
        assert job in services


def test_every_rollcast_service_command_parses_and_its_env_is_valid() -> None:
    services = _compose()["services"]
    parser = build_parser()
    checked = 0
    for name, svc in services.items():
        if svc.get("image") != "rollcast:latest" or svc.get("entrypoint"):
            continue
        args = parser.parse_args(svc["command"])
        assert args.command == svc["command"][0], name
        env = {k: str(v) for k, v in svc["environment"].items()}
        settings = load_settings(env=env)  # raises ConfigError on any unknown key or bad value
        assert settings.kafka.bootstrap_servers == "kafka:9092"
        checked += 1
    assert checked >= 5  # topics, ingest, train, forecast, replay


def test_image_is_non_root_with_rollcast_entrypoint() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["rollcast"]' in text
    assert "USER rollcast" in text
    assert "ARG BASE_IMAGE" in text and "TORCH_INDEX_URL" in text
