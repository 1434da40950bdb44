"""Kafka security settings reach every client; secrets reach neither logs nor MLflow params."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from models.tracking.runs import run_params
from models.train.cycle import Span
from models.train.selection import Candidate
from pipeline.config import load_settings
from pipeline.kafka.clients import _admin_keys, _consumer_keys, _producer_keys, client_kwargs
from pipeline.kafka.producer import rdkafka_config

SECURE = {
    "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": "kafka-1:9093,kafka-2:9093",
    "ROLLCAST_KAFKA__CLIENT": '{security_protocol = "SASL_SSL", sasl_mechanism = "SCRAM-SHA-512", '
    'sasl_plain_username = "svc", sasl_plain_password = "hunter2-secret", ssl_cafile = "/etc/ca.pem", '
    'ssl_certfile = "/etc/cert.pem", ssl_keyfile = "/etc/key.pem", ssl_password = "keypass-secret"}',
}
SECRETS = ("hunter2-secret", "keypass-secret")


def test_security_settings_reach_producer_consumer_and_admin() -> None:
    s = load_settings(env=SECURE)
    for keys in (_producer_keys(), _consumer_keys(), _admin_keys()):
        kw = client_kwargs(s, keys)
        assert kw["bootstrap_servers"] == ["kafka-1:9093", "kafka-2:9093"]
        assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kw["sasl_plain_username"] == "svc" and kw["sasl_plain_password"] == "hunter2-secret"
        assert kw["ssl_cafile"] == "/etc/ca.pem" and kw["ssl_certfile"] == "/etc/cert.pem"
        assert kw["ssl_keyfile"] == "/etc/key.pem" and kw["ssl_password"] == "keypass-secret"


def test_security_settings_reach_the_librdkafka_forecast_producer(caplog) -> None:
    env = {**SECURE, "ROLLCAST_KAFKA__CLIENT": SECURE["ROLLCAST_KAFKA__CLIENT"][:-1]
           + ', ssl_check_hostname = false, max_in_flight_requests_per_connection = 3}'}
    with caplog.at_level(logging.WARNING):
        conf = rdkafka_config(load_settings(env=env))
    assert conf["bootstrap.servers"] == "kafka-1:9093,kafka-2:9093"
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "svc" and conf["sasl.password"] == "hunter2-secret"
    assert conf["ssl.ca.location"] == "/etc/ca.pem" and conf["ssl.certificate.location"] == "/etc/cert.pem"
    assert conf["ssl.key.location"] == "/etc/key.pem" and conf["ssl.key.password"] == "keypass-secret"
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert conf["enable.idempotence"] is True and conf["partitioner"] == "murmur2_random"
    # a kafka-python key with no librdkafka equivalent is named, not silently dropped
    assert "max_in_flight_requests_per_connection" in caplog.text and not any(x in caplog.text for x in SECRETS)


def test_redacted_client_hides_secrets() -> None:
    red = load_settings(env=SECURE).kafka.redacted_client()
    assert red["sasl_plain_password"] == "***" and red["ssl_password"] == "***"
    assert red["sasl_plain_username"] == "svc" and not any(x in str(red) for x in SECRETS)


def test_mlflow_params_and_logs_carry_no_secret(caplog) -> None:
    import models

    s = load_settings(env=SECURE)
    model = models.create_model("tcn", context=8, horizon=3)
    cand = Candidate("tcn", {}, model, [1.0], [1.0], {"holdout_mae": 1.0}, SimpleNamespace(), 0.1)
    span = Span(0, 3_600_000, 1, 10, 6, 2, 2)
    params = run_params(s, cand, span)
    text = " ".join(f"{k}={v}" for k, v in params.items())
    assert params["model_type"] == "tcn"
    assert not any(x in text for x in SECRETS) and "sasl" not in text
    # what a job would log about its Kafka settings
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("rollcast.test").info("kafka client settings: %s", s.kafka.redacted_client())
    assert not any(x in caplog.text for x in SECRETS) and "svc" in caplog.text
