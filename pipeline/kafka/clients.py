"""Kafka clients built from :class:`~pipeline.config.Settings`.

Every client gets the same bootstrap address and the pass-through security
settings (``kafka.client``), so SASL/TLS configured once reach every producer,
consumer and admin client.

The jobs poll through :func:`poll_checked` (directly or by :func:`poll_promptly`): a fetched
record batch that fails its checks (CRC) would otherwise stop a job at that offset for good (see
:class:`FetchGuard`). Three changes to kafka-python 3.0's fetch path, made at import, serve the
same end: a header key that is not UTF-8 no longer blocks a partition, a failed fetch is fetched
again instead of hanging the next poll, and the error names the batch's partition and offsets.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import CorruptRecordError, KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import TopicPartition

from pipeline.config import KafkaSettings, Settings, require_bootstrap
from pipeline.errors import BrokerUnavailable, CorruptBatch
from pipeline.kafka import telemetry as metrics
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


class BadBatchCrc(CorruptRecordError):
    """A fetched record batch whose CRC does not match its bytes. ``base_offset`` is the batch's first
    offset; ``next_offset`` the offset after its last when its header's record count and last offset delta
    agree, else None (the header is inside the bytes the CRC covers, so it may be what is corrupt; a
    compacted batch also lacks the agreement)."""

    def __init__(self, base_offset: int, next_offset: int | None):
        super().__init__(f"record batch at offset {base_offset} failed its CRC check")
        self.base_offset = base_offset
        self.next_offset = next_offset


def _validate_crc_or_raise(upstream: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """kafka-python 3.0's ``DefaultRecordBatch.validate_crc`` (its fetcher is the only caller), raising
    :class:`BadBatchCrc` where upstream returns False: the fetcher's own error names the offset only in its
    text, and never where the batch ends."""

    def validate_crc(self: Any) -> bool:
        if upstream(self):
            return True
        consistent = self.records_count == self.last_offset_delta + 1
        raise BadBatchCrc(self.base_offset, self.next_offset if consistent else None)

    return validate_crc


def _take_then_fetch_again_after_an_error(upstream: Callable[..., list]) -> Callable[..., list]:
    """kafka-python 3.0's ``PartitionRecords.take`` with two additions when unpacking the fetched records
    raised: the records are dropped, so that the next poll fetches the partition again from its position,
    and a :class:`~kafka.errors.CorruptRecordError` learns where it happened (``topic_partition``,
    ``position``: the offset the next fetch starts from).

    Upstream keeps the spent records as the partition's next in line: the next poll of the same consumer,
    finding them neither empty nor able to give a record, loops inside kafka-python forever at 100% CPU
    (the forecast job keeps its consumer across sessions, so a CRC failure would have hung it).
    """

    def take(self: Any, n: int | None = None) -> list:
        try:
            return upstream(self, n)
        except Exception as e:
            self.drain()
            if isinstance(e, CorruptRecordError):
                e.topic_partition, e.position = self.topic_partition, self.next_fetch_offset
            raise

    return take


def _patch_fetch_path() -> None:
    """Install :func:`_read_msg_keeping_bad_header_keys`, :func:`_validate_crc_or_raise` and
    :func:`_take_then_fetch_again_after_an_error` on the kafka-python version they were written for."""
    import kafka
    from kafka.consumer.fetcher import Fetcher
    from kafka.record.default_records import DefaultRecordBatch

    if not kafka.__version__.startswith("3.0."):
        log.warning("kafka-python %s: not patching its fetch path (written for 3.0); a header key that is not "
                    "UTF-8 or a batch that fails its CRC check may stop a job at that record", kafka.__version__)
        return
    DefaultRecordBatch._read_msg = _read_msg_keeping_bad_header_keys
    DefaultRecordBatch.validate_crc = _validate_crc_or_raise(DefaultRecordBatch.validate_crc)
    records = Fetcher.PartitionRecords
    records.take = _take_then_fetch_again_after_an_error(records.take)


_patch_fetch_path()

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
    second more. Each slice polls through the consumer's :class:`FetchGuard` (see :func:`poll_checked`).
    """
    guard = fetch_guard(consumer)
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        left_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
        records = guard.poll(consumer, min(slice_ms, left_ms))
        if records or left_ms <= slice_ms:
            return records


class FetchGuard:
    """What a consumer does about a fetched batch that fails its checks: ``kafka.on_corrupt_batch``.

    kafka-python raises :class:`~kafka.errors.CorruptRecordError` from ``poll()`` when a batch fails its CRC
    check (or a record of it cannot be parsed). The session failed, the job retried it as an outage, the
    new session fetched the same bytes and failed again, forever, never getting past the batch. Here a
    failure is fetched again (a bit flipped in transit heals) until ``kafka.corrupt_batch_attempts``
    fetches of the same partition and offset in a row have failed; then the batch is counted
    (``rollcast_corrupt_batches_total{action}``), logged as an error with its topic, partition and offsets,
    and either ends the job (``stop``: :class:`~pipeline.errors.CorruptBatch`) or is skipped (``skip``: a
    seek past the batch's last offset when its header says where that is, else past one offset at a time,
    each step counted and logged, until a fetch succeeds). Skipped records are lost to the job; their
    offsets are in the log.
    """

    def __init__(self, action: str, attempts: int):
        self.action = action
        self.attempts = attempts
        self.failing: dict[TopicPartition, tuple[int, int]] = {}  # partition -> (offset, failed fetches in a row)
        self.skipping: dict[TopicPartition, int] = {}  # partition -> the offset a failure continues a skip at

    @classmethod
    def of(cls, kafka: KafkaSettings) -> FetchGuard:
        return cls(kafka.on_corrupt_batch, kafka.corrupt_batch_attempts)

    def poll(self, consumer: Any, timeout_ms: int) -> dict:
        """``consumer.poll(timeout_ms=timeout_ms)``; nothing (``{}``) from a poll whose fetch failed its checks."""
        try:
            records = consumer.poll(timeout_ms=timeout_ms)
        except CorruptRecordError as e:
            if getattr(e, "topic_partition", None) is None:  # not from unpacking a fetch: nothing to place
                raise
            self.failed(consumer, e)
            return {}
        if self.failing or self.skipping:
            for tp in records:  # the partition reads again
                self.failing.pop(tp, None)
                self.skipping.pop(tp, None)
        return records

    def failed(self, consumer: Any, e: Any) -> None:
        """One failed fetch (``e`` as :func:`_take_then_fetch_again_after_an_error` left it): count it, then
        fetch again, stop or skip."""
        tp, base = e.topic_partition, getattr(e, "base_offset", None)
        where = e.position if base is None else base  # the batch, or where parsing failed
        if self.skipping.get(tp) == where:  # the rest of a batch being skipped one offset at a time
            self.skip(consumer, e, "again, after the skip before")
            return
        last, n = self.failing.get(tp, (None, 0))
        n = n + 1 if last == where else 1
        if n < self.attempts:
            self.failing[tp] = (where, n)
            log.warning("topic %s, partition %d, offset %d: %s; fetching it again (%d of %d)",
                        tp.topic, tp.partition, where, _detail(e), n, self.attempts)
            return
        self.failing.pop(tp, None)
        if self.action == "skip":
            self.skip(consumer, e, f"on {n} fetches in a row")
            return
        metrics.CORRUPT_BATCHES.labels(action="stop").inc()
        message = (f"topic {tp.topic}, partition {tp.partition}, offset {where}: {_detail(e)}, on {n} fetches in "
                   "a row. kafka.on_corrupt_batch=stop ends the job; set it to skip to move past the batch (its "
                   "records are lost to the job), or repair or delete the partition's data")
        log.error("%s", message)
        raise CorruptBatch(message) from e

    def skip(self, consumer: Any, e: Any, why: str) -> None:
        """Seek past the failed batch: to its next offset when its header is consistent, else one offset on."""
        tp, base, end = e.topic_partition, getattr(e, "base_offset", None), getattr(e, "next_offset", None)
        first = e.position if base is None else max(e.position, base)
        to = end if end is not None and end > first else first + 1
        consumer.seek(tp, to)
        self.skipping[tp] = to if base is None else base
        metrics.CORRUPT_BATCHES.labels(action="skip").inc()
        log.error("topic %s, partition %d: skipped offsets %d to %d (kafka.on_corrupt_batch=skip): %s, %s; "
                  "those records are lost to this job", tp.topic, tp.partition, first, to - 1, _detail(e), why)


def _detail(e: BaseException) -> str:
    """What a kafka-python error says, without its ``[Error 2] ClassName:`` prefix."""
    return str(e.args[0]) if e.args else type(e).__name__


# each consumer's guard, made by make_consumer from its settings (the defaults for any other consumer)
_GUARDS: weakref.WeakKeyDictionary[Any, FetchGuard] = weakref.WeakKeyDictionary()


def fetch_guard(consumer: Any) -> FetchGuard:
    """The :class:`FetchGuard` of ``consumer``."""
    guard = _GUARDS.get(consumer)
    if guard is None:
        guard = _GUARDS[consumer] = FetchGuard.of(KafkaSettings())
    return guard


def poll_checked(consumer: Any, timeout_ms: int) -> dict:
    """``consumer.poll(timeout_ms=timeout_ms)``, a batch that fails its checks handled by the consumer's
    :class:`FetchGuard`. Every poll of the ingest and forecast jobs goes through it."""
    return fetch_guard(consumer).poll(consumer, timeout_ms)


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
    _GUARDS[consumer] = FetchGuard.of(settings.kafka)
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
        settings.topics.anomalies,
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
