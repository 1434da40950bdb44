"""Kafka clients built from :class:`~pipeline.config.Settings`.

Every client gets the same bootstrap address and the pass-through security
settings (``kafka.client``), so SASL/TLS configured once reach every producer,
consumer and admin client.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from pipeline.config import Settings, require_bootstrap
from pipeline.errors import BrokerUnavailable

log = logging.getLogger(__name__)


def _producer_keys() -> frozenset[str]:
    return frozenset(KafkaProducer.DEFAULT_CONFIG)


def _consumer_keys() -> frozenset[str]:
    return frozenset(KafkaConsumer.DEFAULT_CONFIG)


def _admin_keys() -> frozenset[str]:
    return frozenset(KafkaAdminClient.DEFAULT_CONFIG)


def client_kwargs(settings: Settings, accepted: frozenset[str]) -> dict[str, Any]:
    """Bootstrap address plus the ``kafka.client`` pass-through keys a client accepts."""
    kwargs: dict[str, Any] = {"bootstrap_servers": require_bootstrap(settings).split(",")}
    kwargs.update({k: v for k, v in settings.kafka.client.items() if k in accepted})
    return kwargs


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A producer that waits for all in-sync replicas and retries idempotently."""
    kwargs = client_kwargs(settings, _producer_keys())
    kwargs.update(
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        batch_size=1 << 20,
        max_request_size=16 << 20,
        request_timeout_ms=int(settings.kafka.connect_timeout_s * 1000) + 20_000,
    )
    kwargs.update(overrides)
    return _connect(KafkaProducer, settings, kwargs)


def make_consumer(settings: Settings, group_id: str | None, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits (``enable_auto_commit=False``)."""
    kwargs = client_kwargs(settings, _consumer_keys())
    kwargs.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        heartbeat_interval_ms=settings.kafka.heartbeat_interval_ms,
        session_timeout_ms=settings.kafka.session_timeout_ms,
        max_poll_records=settings.kafka.max_poll_records,
        fetch_max_bytes=settings.kafka.fetch_max_bytes,
        max_partition_fetch_bytes=settings.kafka.max_partition_fetch_bytes,
        fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
    )
    # A subscribed topic that disappears (a broker that lost it) or appears later is noticed only at
    # the next metadata refresh: every 10 s rather than kafka-python's 5 minutes (kafka.client may override).
    kwargs.setdefault("metadata_max_age_ms", settings.kafka.client.get("metadata_max_age_ms", 10_000))
    kwargs.update(overrides)
    consumer = _connect(KafkaConsumer, settings, kwargs)
    if topics:
        consumer.subscribe(list(topics))
    return consumer


def make_admin(settings: Settings) -> KafkaAdminClient:
    return _connect(KafkaAdminClient, settings, client_kwargs(settings, _admin_keys()))


def _connect(cls: type, settings: Settings, kwargs: dict[str, Any]) -> Any:
    """Construct a client; give up after ``kafka.connect_timeout_s`` with a clear error."""
    kwargs.setdefault("bootstrap_timeout_ms", int(settings.kafka.connect_timeout_s * 1000))
    try:
        return cls(**kwargs)
    except KafkaTimeoutError as e:
        raise BrokerUnavailable(
            f"kafka.bootstrap_servers: no broker answered at {settings.kafka.bootstrap_servers} "
            f"within kafka.connect_timeout_s={settings.kafka.connect_timeout_s:g}s; "
            "is the broker running and the address right?"
        ) from e


def wait_for_broker(settings: Settings) -> None:
    """Return once the broker answers metadata requests, else raise :class:`BrokerUnavailable`."""
    admin = make_admin(settings)
    admin.close()


def ensure_topics(settings: Settings, names: list[str] | None = None, partitions: int | None = None) -> None:
    """Create rollcast's topics (or ``names``) if they do not exist yet."""
    names = names or [
        settings.topics.observations,
        settings.topics.dlq,
        settings.topics.windows,
        settings.topics.forecasts,
    ]
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(n, partitions or settings.kafka.partitions, settings.kafka.replication_factor)
            for n in names
            if n not in existing
        ]
        if new:
            # another process may create one between list and create
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new, timeout_ms=int(settings.kafka.connect_timeout_s * 1000))
            log.info("created topics %s", [t.name for t in new])
    except KafkaError as e:
        raise BrokerUnavailable(f"could not create topics {names}: {e}") from e
    finally:
        admin.close()


class Backoff:
    """Growing pauses between the sessions of a job whose Kafka session failed: 1 s, 2 s, 4 s, ...
    up to ``cap_s``. :meth:`sleep` checks ``stopped`` every 0.1 s, so a shutdown cuts a pause short."""

    def __init__(self, first_s: float = 1.0, cap_s: float = 30.0):
        self.delay_s = first_s
        self.cap_s = cap_s

    def sleep(self, stopped: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.delay_s
        while not stopped() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.delay_s = min(self.delay_s * 2, self.cap_s)

