"""The forecast job's producer: many keyed messages to one topic, confirmed by the broker (librdkafka)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.config import Settings, require_bootstrap
from pipeline.errors import BrokerUnavailable
from pipeline.kafka.clients import _producer_keys

log = logging.getLogger("pipeline.kafka")

PARTITIONS_TTL_S = 10.0  # how long BulkProducer.partitions trusts the partition count it last got


# kafka-python client keys (``kafka.client``) and their librdkafka names; a value function converts.
_RDKAFKA_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "security_protocol": ("security.protocol", str),
    "sasl_mechanism": ("sasl.mechanism", str),
    "sasl_plain_username": ("sasl.username", str),
    "sasl_plain_password": ("sasl.password", str),
    "sasl_kerberos_service_name": ("sasl.kerberos.service.name", str),
    "ssl_cafile": ("ssl.ca.location", str),
    "ssl_certfile": ("ssl.certificate.location", str),
    "ssl_keyfile": ("ssl.key.location", str),
    "ssl_password": ("ssl.key.password", str),
    "ssl_crlfile": ("ssl.crl.location", str),
    "ssl_ciphers": ("ssl.cipher.suites", str),
    "ssl_check_hostname": ("ssl.endpoint.identification.algorithm", lambda v: "https" if v else "none"),
    "client_id": ("client.id", str),
    "metadata_max_age_ms": ("metadata.max.age.ms", int),
    "reconnect_backoff_ms": ("reconnect.backoff.ms", int),
    "reconnect_backoff_max_ms": ("reconnect.backoff.max.ms", int),
    "connections_max_idle_ms": ("connections.max.idle.ms", int),
    "send_buffer_bytes": ("socket.send.buffer.bytes", int),
    "receive_buffer_bytes": ("socket.receive.buffer.bytes", int),
    "compression_type": ("compression.type", str),
}


def rdkafka_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings for :class:`BulkProducer`: bootstrap address, the ``kafka.client`` keys
    translated (a key without a librdkafka equivalent is named in a warning and not used), and an
    idempotent producer that waits for all in-sync replicas, like :func:`make_producer`."""
    conf: dict[str, Any] = {"bootstrap.servers": require_bootstrap(settings)}
    unmapped = []
    for key, value in settings.kafka.client.items():
        if key in _RDKAFKA_KEYS:
            name, convert = _RDKAFKA_KEYS[key]
            conf[name] = convert(value)
        elif key in _producer_keys():
            unmapped.append(key)
    if unmapped:
        log.warning("kafka.client keys %s have no librdkafka equivalent; the forecast producer ignores them",
                    sorted(unmapped))
    conf.update({
        "enable.idempotence": True,  # implies acks=all and ordered retries without duplicates
        "partitioner": "murmur2_random",  # the Java client's and kafka-python's choice for keyed messages
        "linger.ms": 0,  # callers send what is ready and confirm at once; nothing to wait for
        "message.max.bytes": 16 << 20,
        "batch.size": 16 << 20,
        "message.timeout.ms": int(settings.kafka.connect_timeout_s * 1000) + 20_000,
        # delivery reports (a Python callback each, served on the caller's thread) only for failures:
        # success is what flush() returning 0 says
        "delivery.report.only.error": True,
    })
    return conf


class BulkProducer:
    """Many keyed messages to one topic at a time, confirmed by the broker: librdkafka underneath.

    The forecast job sends one message per series per window; kafka-python's pure-Python producer
    spends far longer per message on the caller's thread and its I/O thread than librdkafka (C, own
    threads; figures in BENCHMARKS.md). :meth:`send` queues messages that librdkafka starts sending at
    once, so a caller can build the next ones meanwhile; :meth:`confirm` returns only when every message
    is acknowledged and raises :class:`~pipeline.errors.BrokerUnavailable` otherwise (undelivered messages
    are purged, so a retry with a new producer may repeat some but never reorders a partition behind them).
    """

    def __init__(self, settings: Settings, **overrides: Any):
        from confluent_kafka import KafkaException, Producer

        self.settings = settings
        self._producer = Producer({**rdkafka_config(settings), **overrides}, logger=log)
        self._failed: list[Any] = []  # delivery errors since the last confirm()
        self._partition_counts: dict[str, tuple[float, int]] = {}  # topic -> (monotonic time asked, partitions)
        try:  # fail fast with the same clear error as the kafka-python clients
            self._producer.list_topics(timeout=settings.kafka.connect_timeout_s)
        except KafkaException as e:
            raise BrokerUnavailable(
                f"kafka.bootstrap_servers: no broker answered at {settings.kafka.bootstrap_servers} "
                f"within kafka.connect_timeout_s={settings.kafka.connect_timeout_s:g}s: {e}"
            ) from e

    def partitions(self, topic: str) -> int:
        """Number of partitions of ``topic`` (0 if the broker does not know it), asked of the broker at most
        every :data:`PARTITIONS_TTL_S` while it is known: a metadata request is a round trip to the broker,
        and the forecast job asks before every batch. A topic that lost partitions or went meanwhile fails
        the sends to it (:meth:`confirm` raises), and the next session's producer asks again."""
        cached = self._partition_counts.get(topic)
        if cached is not None and time.monotonic() - cached[0] < PARTITIONS_TTL_S:
            return cached[1]
        n = self._ask_partitions(topic)
        if n:
            self._partition_counts[topic] = (time.monotonic(), n)
        return n

    def _ask_partitions(self, topic: str) -> int:
        from confluent_kafka import KafkaException

        try:
            meta = self._producer.list_topics(topic, timeout=self.settings.kafka.connect_timeout_s)
        except KafkaException as e:
            raise BrokerUnavailable(f"no metadata for topic {topic!r}: {e}") from e
        found = meta.topics.get(topic)
        return 0 if found is None or found.error is not None else len(found.partitions)

    def send(self, topic: str, messages: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Queue ``(key, value, partition)`` messages; librdkafka sends them at once, in the background.
        :meth:`confirm` waits for the broker's acknowledgement of everything sent."""
        produce = self._producer.produce
        for key, value, partition in messages:
            while True:
                try:
                    produce(topic, value, key, partition, on_delivery=self._delivered)
                    break
                except BufferError:  # local queue full: serve delivery reports, then try again
                    self._producer.poll(0.05)
        self._producer.poll(0)  # serve delivery reports (and librdkafka's logs) of earlier messages

    def confirm(self, topic: str, timeout_s: float) -> None:
        """Return when the broker acknowledged every message sent so far; otherwise purge what is left and
        raise :class:`~pipeline.errors.BrokerUnavailable`."""
        left = self._producer.flush(timeout_s)
        failed, self._failed = self._failed, []
        if left or failed:
            self._producer.purge()
            self._producer.flush(0)
            reason = f"{failed[0]} ({len(failed)} failed)" if failed else f"{left} not acknowledged in {timeout_s:g}s"
            raise BrokerUnavailable(f"messages to {topic!r} not delivered: {reason}")

    def _delivered(self, err: Any, msg: Any) -> None:
        """librdkafka's delivery report (served by ``poll``/``flush`` on the caller's thread)."""
        if err is not None:
            self._failed.append(err)

    def close(self, timeout_s: float) -> None:
        """Deliver what is queued (up to ``timeout_s``), then drop the rest."""
        if self._producer.flush(timeout_s):
            self._producer.purge()
            self._producer.flush(0)
