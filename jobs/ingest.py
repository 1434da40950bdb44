"""Consume observations, validate them, window them by event time, and store closed windows.

Runs in the consumer group `groups.ingest` on `topics.observations`; start
several processes to share partitions. Bad input goes to `topics.dlq` with
its reason; closed windows go to the history store (Parquet under
data_dir/history) and to `topics.windows` (Arrow IPC). Offsets are committed
only after both are durable, so a crash or kill -9 loses and doubles nothing.
SIGTERM/SIGINT finish the current batch, checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import time
from typing import Any

from pipeline.config import Settings

HELP = "window observations from Kafka into the history store and the windows topic"

log = logging.getLogger("rollcast.ingest")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-when-idle", "--max-idle-s", dest="exit_when_idle", type=float, metavar="SECONDS",
        help="checkpoint and exit 0 once no message arrived for SECONDS (tests, benchmarks, demos)",
    )
    parser.add_argument(
        "--checkpoint-interval-s", type=float, default=1.0,
        help="seconds between checkpoints (store write + produce + commit; default 1)",
    )
    parser.add_argument("--poll-timeout-ms", type=int, default=200, help="consumer poll timeout (default 200)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline import metrics
    from pipeline.config import require_bootstrap
    from pipeline.ingestor import GIL_SWITCH_INTERVAL_S
    from pipeline.kafka import ensure_topics
    from pipeline.observability import BrokerProbe, Health, LagTracker, exit_after, serve_http

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the window worker gets the GIL back promptly
    stop: list[int] = []

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d; finishing the current batch", signum)
        if not stop:
            exit_after(settings.observability.shutdown_timeout_s, "ingest")
        stop.append(signum)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    health = Health("ingest", poll_interval_s=max(30.0, 3 * args.checkpoint_interval_s))
    if settings.observability.metrics_port is not None:
        serve_http(settings.observability.metrics_port, health)
    probe = BrokerProbe(health, require_bootstrap(settings)).start()
    ensure_topics(settings, [settings.topics.observations, settings.topics.dlq, settings.topics.windows])
    lag = LagTracker(metrics.CONSUMER_LAG)
    log.info("ingesting %s in group %s", settings.topics.observations, settings.groups.ingest)
    totals = [0, 0]
    try:
        ok = _consume_with_retries(settings, args, stop, health, lag, totals)
    finally:
        probe.stop()
    log.info("stopped after %d messages, %d observations windowed", *totals)
    return 0 if ok else 1


def _consume_with_retries(settings: Settings, args: argparse.Namespace, stop: list[int], health: Any,
                          lag: Any, totals: list[int]) -> bool:
    """Run :func:`_consume` until asked to stop; after a Kafka or history store error (an S3 outage, a
    full disk), back off and start over.

    Starting over is what a restarted process does: the in-memory state is
    dropped and rebuilt from the history store's progress records, and a new
    consumer resumes from the committed offsets (with a new producer: an
    idempotent one is refused by a broker that lost its producer id), so nothing that was not
    durable is ever committed. One warning per outage; retries log at debug.
    Returns False if the final checkpoint could not be made.
    """
    from kafka.errors import KafkaError

    from pipeline.checkpoint import CheckpointError
    from pipeline.errors import BrokerUnavailable, StoreUnavailable
    from pipeline.kafka import Backoff, ensure_topics

    backoff, failing = Backoff(), False
    while True:
        try:
            if failing:
                ensure_topics(settings, [settings.topics.observations, settings.topics.dlq, settings.topics.windows])
            _consume(settings, args, stop, health, lag, totals)
            return True
        except (KafkaError, CheckpointError, BrokerUnavailable, StoreUnavailable) as e:
            health.facts["last_error"] = f"{type(e).__name__}: {e}"
            if stop:
                log.error("final checkpoint failed (%s); a restart redoes the unfinished work", e)
                return False
            if not failing:
                what = "history store" if isinstance(e, StoreUnavailable) else "Kafka"
                log.warning("%s error in the ingest loop (%s: %s); dropping what is not durable, resuming from "
                            "the history store and the committed offsets", what, type(e).__name__, e)
            else:
                log.debug("still failing: %s", e)
            failing = True
            backoff.sleep(lambda: bool(stop))
            if stop:
                return True  # nothing is held that is not durable: the failed session was dropped


def _consume(settings: Settings, args: argparse.Namespace, stop: list[int], health: Any, lag: Any,
             totals: list[int]) -> None:
    """One consumer session: subscribe, poll, window, checkpoint; a final checkpoint when stopped."""
    from kafka.errors import KafkaError

    from pipeline.ingestor import Ingestor
    from pipeline.kafka import make_consumer, make_producer, poll_promptly

    producer = make_producer(settings)
    consumer = make_consumer(settings, settings.groups.ingest)
    ingestor = None
    clean = False
    try:
        ingestor = Ingestor(settings, consumer, producer, checkpoint_interval_s=args.checkpoint_interval_s)
        consumer.subscribe([settings.topics.observations], listener=ingestor.listener())
        gc.enable()  # started: the collector was off for the imports (jobs.cli.collector_off_during_start_up)
        last_data = time.monotonic()
        while not stop:
            batch = poll_promptly(consumer, args.poll_timeout_ms)
            health.polled()
            ingestor.raise_failed()  # a checkpoint inside a rebalance callback failed
            lag.update(consumer, batch)
            now = time.monotonic()
            ingestor.submit(batch, now)  # processed while the next poll fetches and decodes
            if batch or ingestor.rebalancing:
                last_data = now  # the idle clock runs only while partitions are assigned
            last_data = max(last_data, ingestor.last_assigned)
            ingestor.maybe_checkpoint(now)  # queues a checkpoint (idle series first); commits finished ones
            if args.exit_when_idle is not None and now - last_data >= args.exit_when_idle:
                log.info("no input for %gs; exiting", args.exit_when_idle)
                stop.append(0)
                break
        ingestor.close_idle()
        ingestor.checkpoint()
        clean = True
    finally:
        if ingestor is not None:
            totals[0] += ingestor.messages
            totals[1] += ingestor.accepted
            ingestor.close()
        try:
            consumer.close(autocommit=False)
        except KafkaError as e:  # leaving the group while the broker is down
            log.debug("closing the consumer: %s", e)
        producer.close(timeout=settings.observability.shutdown_timeout_s if clean else 1.0)
