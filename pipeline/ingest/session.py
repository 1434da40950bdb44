"""One consumer session of ingest: subscribe, poll, window, checkpoint, and a final checkpoint when it
stops. ``rollcast ingest`` runs it (again after an outage, see :func:`pipeline.runtime.retry_sessions`),
and so do the ingest benchmarks, so they measure the loop the job runs.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Settings

log = logging.getLogger("rollcast.ingest")


@dataclass
class Totals:
    """What the sessions of one process handled, added up."""

    messages: int = 0  # Kafka messages
    accepted: int = 0  # observations placed in a window
    rows: int = 0  # observations decoded or rejected (an Arrow message holds many)


def consume_session(
    settings: Settings,
    stop: threading.Event,
    totals: Totals,
    *,
    checkpoint_interval_s: float = 1.0,
    poll_timeout_ms: int = 200,
    exit_when_idle_s: float | None = None,
    health: Any = None,
    lag: Any = None,
    until: Callable[[Any], bool] | None = None,
    on_poll: Callable[[dict, Any], None] | None = None,
) -> None:
    """Ingest ``topics.observations`` in group ``groups.ingest`` until ``stop`` is set, until no message
    arrived for ``exit_when_idle_s`` while partitions were assigned (then ``stop`` is set), or until
    ``until(ingestor)`` is true; then close idle windows and make a final checkpoint.

    ``health`` and ``lag`` (:class:`~pipeline.observability.Health`, ``LagTracker``) are told of every
    poll; ``on_poll(batch, ingestor)`` sees each poll's records (benchmarks time and sample with it).
    Kafka, checkpoint and store errors propagate: the caller starts a new session.
    """
    from kafka.errors import KafkaError

    from pipeline.ingest.ingestor import Ingestor
    from pipeline.kafka.clients import make_consumer, make_producer, poll_promptly

    producer = make_producer(settings)
    consumer = make_consumer(settings, settings.groups.ingest)
    ingestor = None
    clean = False
    try:
        ingestor = Ingestor(settings, consumer, producer, checkpoint_interval_s=checkpoint_interval_s)
        consumer.subscribe([settings.topics.observations], listener=ingestor.listener())
        gc.enable()  # started: the collector was off for the imports (jobs.cli.collector_off_during_start_up)
        last_data = time.monotonic()
        while not stop.is_set():
            batch = poll_promptly(consumer, poll_timeout_ms)
            if health is not None:
                health.polled()
            ingestor.raise_failed()  # a checkpoint inside a rebalance callback failed
            if lag is not None:
                lag.update(consumer, batch)
            if on_poll is not None:
                on_poll(batch, ingestor)
            now = time.monotonic()
            ingestor.submit(batch, now)  # processed while the next poll fetches and decodes
            if batch or ingestor.rebalancing:
                last_data = now  # the idle clock runs only while partitions are assigned
            last_data = max(last_data, ingestor.last_assigned)
            ingestor.maybe_checkpoint(now)  # queues a checkpoint (idle series first); commits finished ones
            if exit_when_idle_s is not None and now - last_data >= exit_when_idle_s:
                log.info("no input for %gs; exiting", exit_when_idle_s)
                stop.set()
                break
            if until is not None and until(ingestor):
                break
        ingestor.close_idle()
        ingestor.checkpoint()
        clean = True
    finally:
        if ingestor is not None:
            totals.messages += ingestor.messages
            totals.accepted += ingestor.accepted
            totals.rows += ingestor.rows
            ingestor.close()
        try:
            consumer.close(autocommit=False)
        except KafkaError as e:  # leaving the group while the broker is down
            log.debug("closing the consumer: %s", e)
        producer.close(timeout=settings.observability.shutdown_timeout_s if clean else 1.0)
