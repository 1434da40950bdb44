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
import sys

from pipeline.config import Settings
from pipeline.runtime import Shutdown

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
    from kafka.errors import KafkaError

    from pipeline.config import require_bootstrap
    from pipeline.errors import BrokerUnavailable, StoreUnavailable
    from pipeline.ingest import telemetry as metrics
    from pipeline.ingest.checkpoint import CheckpointError
    from pipeline.ingest.ingestor import GIL_SWITCH_INTERVAL_S
    from pipeline.ingest.session import Totals, consume_session
    from pipeline.kafka.clients import ensure_topics
    from pipeline.observability import BrokerProbe, Health, LagTracker, serve_http
    from pipeline.runtime import retry_sessions

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the window worker gets the GIL back promptly
    stop = Shutdown("ingest", settings.observability.shutdown_timeout_s)
    health = Health("ingest", poll_interval_s=max(30.0, 3 * args.checkpoint_interval_s))
    if settings.observability.metrics_port is not None:
        serve_http(settings.observability.metrics_port, health)
    probe = BrokerProbe(health, require_bootstrap(settings)).start()
    ensure_topics(settings, [settings.topics.observations, settings.topics.dlq, settings.topics.windows])
    lag = LagTracker(metrics.CONSUMER_LAG)
    log.info("ingesting %s in group %s", settings.topics.observations, settings.groups.ingest)
    totals = Totals()
    topics = [settings.topics.observations, settings.topics.dlq, settings.topics.windows]
    try:
        # Starting over is what a restarted process does: the in-memory state is dropped and rebuilt
        # from the history store's progress records, and a new consumer resumes from the committed
        # offsets (with a new producer: an idempotent one is refused by a broker that lost its producer
        # id), so nothing that was not durable is ever committed.
        ok = retry_sessions(
            lambda: consume_session(settings, stop, totals, checkpoint_interval_s=args.checkpoint_interval_s,
                                    poll_timeout_ms=args.poll_timeout_ms, exit_when_idle_s=args.exit_when_idle,
                                    health=health, lag=lag),
            job="ingest", shutdown=stop, health=health,
            errors=(KafkaError, CheckpointError, BrokerUnavailable, StoreUnavailable),
            resuming="dropping what is not durable, resuming from the history store and the committed offsets",
            before_retry=lambda: ensure_topics(settings, topics),
        )
    finally:
        probe.stop()
    log.info("stopped after %d messages, %d observations windowed", totals.messages, totals.accepted)
    return 0 if ok else 1
