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
import logging
import signal
import time

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
    from pipeline.ingestor import Ingestor
    from pipeline.kafka import ensure_topics, make_consumer, make_producer

    ensure_topics(settings, [settings.topics.observations, settings.topics.dlq, settings.topics.windows])
    consumer = make_consumer(settings, settings.groups.ingest)
    producer = make_producer(settings)
    ingestor = Ingestor(settings, consumer, producer, checkpoint_interval_s=args.checkpoint_interval_s)
    consumer.subscribe([settings.topics.observations], listener=ingestor.listener())

    stop: list[int] = []

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d; finishing the current batch", signum)
        stop.append(signum)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info("ingesting %s in group %s", settings.topics.observations, settings.groups.ingest)
    last_data = time.monotonic()
    try:
        while not stop:
            batch = consumer.poll(timeout_ms=args.poll_timeout_ms)
            now = time.monotonic()
            ingestor.submit(batch, now)  # processed while the next poll fetches and decodes
            if batch or ingestor.rebalancing:
                last_data = now  # the idle clock runs only while partitions are assigned
            last_data = max(last_data, ingestor.last_assigned)
            ingestor.maybe_checkpoint(now)  # closes idle series, then checkpoints
            if args.exit_when_idle is not None and now - last_data >= args.exit_when_idle:
                log.info("no input for %gs; exiting", args.exit_when_idle)
                break
        ingestor.close_idle()
        ingestor.checkpoint()
    finally:
        ingestor.close()
        consumer.close(autocommit=False)
        producer.close(timeout=settings.observability.shutdown_timeout_s)
    log.info("stopped after %d messages, %d observations windowed", ingestor.messages, ingestor.accepted)
    return 0
