"""Create rollcast's topics on the configured Kafka cluster and list them.

Creates observations, observations.dlq, windows, forecasts, scores and anomalies (names from
[topics]) with kafka.partitions partitions and kafka.replication_factor
replicas where they do not exist yet; existing topics are left as they are.
Run it once before scaling ingest and forecast out, so that every replica
shares the same partitions.
"""

from __future__ import annotations

import argparse

from pipeline.config import Settings

HELP = "create the configured topics (idempotent) and list their partitions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partitions", type=int, help="partitions for new topics (default: kafka.partitions)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.kafka.clients import ensure_topics, make_consumer

    ensure_topics(settings, partitions=args.partitions)
    consumer = make_consumer(settings, None)
    try:
        t = settings.topics
        for name in (t.observations, t.dlq, t.windows, t.forecasts, t.scores, t.anomalies):
            parts = consumer.partitions_for_topic(name) or set()
            print(f"{name}: {len(parts)} partitions")
    finally:
        consumer.close()
    return 0
