"""Kafka clients built from :class:`~pipeline.config.Settings`.

Every client gets the same bootstrap address and the pass-through security
settings (``kafka.client``), so SASL/TLS configured once reach every producer,
consumer and admin client.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from pipeline.config import Settings, require_bootstrap
from pipeline.errors import BrokerUnavailable
from pipeline.kafka.headers import header_key

log = logging.getLogger("pipeline.kafka")


def _read_msg_keeping_bad_header_keys(self: Any, decode_varint: Callable[..., Any] | None = None) -> Any:
    """kafka-python 3.0's ``DefaultRecordBatch._read_msg`` with one change: a header key that is not
    UTF-8 is read as a :class:`HeaderKey` (see :func:`header_key`) instead of raising.

    Upstream decodes header keys strictly; a producer that sends a key of bad bytes made
    ``consumer.poll()`` raise (``CorruptRecordError`` wrapping a ``UnicodeDecodeError``) at that record
    on every try, so no retry or restart got past it: the partition was blocked for good. Read this
    way the record reaches the decoder and the dead-letter topic like any other.
    """
    from kafka.record import default_records as dr

    decode_varint = decode_varint or dr.decode_varint
    buffer = self._buffer
    pos = self._pos
    length, pos = decode_varint(buffer, pos)
    start_pos = pos
    _, pos = decode_varint(buffer, pos)  # attributes
    ts_delta, pos = decode_varint(buffer, pos)
    timestamp = self.max_timestamp if self.timestamp_type == self.LOG_APPEND_TIME else self.first_timestamp + ts_delta
    offset_delta, pos = decode_varint(buffer, pos)
    offset = self.base_offset + offset_delta
    fields = []
    for _ in range(2):  # key, value: nullable bytes
        n, pos = decode_varint(buffer, pos)
        fields.append(bytes(buffer[pos : pos + n]) if n >= 0 else None)
        pos += max(n, 0)
    key, value = fields
    header_count, pos = decode_varint(buffer, pos)
    if header_count < 0:
        raise dr.CorruptRecordError(f"Found invalid number of record headers {header_count}")
    headers = []
    for _ in range(header_count):
        h_key_len, pos = decode_varint(buffer, pos)
        if h_key_len < 0:
            raise dr.CorruptRecordError(f"Invalid negative header key size {h_key_len}")
        h_key = header_key(bytes(buffer[pos : pos + h_key_len]))
        pos += h_key_len
        h_value_len, pos = decode_varint(buffer, pos)
        if h_value_len >= 0:
            h_value = bytes(buffer[pos : pos + h_value_len])
            pos += h_value_len
        else:
            h_value = None
        headers.append((h_key, h_value))
    if pos - start_pos != length:
        raise dr.CorruptRecordError(
            f"Invalid record size: expected to read {length} bytes in record payload, but instead read {pos - start_pos}"
        )
    self._pos = pos
    cls = dr.ControlRecord if self.is_control_batch else dr.DefaultRecord
    return cls(length, offset, timestamp, self.timestamp_type, key, value, headers)


def _tolerate_bad_header_keys() -> None:
    """Install :func:`_read_msg_keeping_bad_header_keys` on the kafka-python version it was copied from."""
    import kafka
    from kafka.record.default_records import DefaultRecordBatch

    if not kafka.__version__.startswith("3.0."):
        log.warning("kafka-python %s: not patching its header key decoding (written for 3.0); a header key "
                    "that is not UTF-8 may stop ingest at that record", kafka.__version__)
        return
    DefaultRecordBatch._read_msg = _read_msg_keeping_bad_header_keys


_tolerate_bad_header_keys()

# longest kafka-python's poll may sleep without fetching (see poll_promptly)
POLL_SLICE_MS = 5


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


def poll_promptly(consumer: KafkaConsumer, timeout_ms: int, slice_ms: int = POLL_SLICE_MS) -> dict:
    """``consumer.poll(timeout_ms)`` that returns records within ``slice_ms`` of their being fetchable.

    When kafka-python's fetcher has, at that instant, no fetch in flight and no partition it may fetch
    (it happens now and then between two fetches), ``poll`` sleeps for min(timeout, ``retry_backoff_ms``,
    100 ms by default) without sending the next fetch, and records that arrive meanwhile wait for the
    sleep to end. In the forecast latency benchmark such sleeps (logged from inside kafka-python) made
    the slowest rounds (BENCHMARKS.md, "kafka-python's idle sleep"). Polling in slices bounds the sleep;
    while a fetch is in flight each slice just waits on it, so a quiet topic costs a few cheap polls a
    second more.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        left_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
        records = consumer.poll(timeout_ms=min(slice_ms, left_ms))
        if records or left_ms <= slice_ms:
            return records


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
        settings.topics.scores,
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



# --------------------------------------------------------------------------- librdkafka producer
