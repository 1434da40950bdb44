"""Prometheus metrics of the ingest path, as module-level objects.

They live in prometheus-client's default registry (``REGISTRY``), so a job
exposes them all with ``prometheus_client.start_http_server(port)``.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge

__all__ = [
    "REGISTRY",
    "MESSAGES",
    "OBSERVATIONS",
    "REJECTED",
    "WINDOWS_CLOSED",
    "OPEN_WINDOWS",
    "CHECKPOINTS",
    "CONSUMER_LAG",
    "WATERMARK",
]

MESSAGES = Counter(
    "rollcast_ingest_messages_total", "Kafka messages consumed from the observations topic", ["format"]
)
OBSERVATIONS = Counter(
    "rollcast_ingest_observations_total", "Observations accepted into a window", ["format"]
)
REJECTED = Counter(
    "rollcast_ingest_rejected_total",
    "Observations or messages sent to the dead-letter topic, by reason",
    ["reason"],
)
WINDOWS_CLOSED = Counter(
    "rollcast_ingest_windows_closed_total",
    "Windows written to the history store, by cause (watermark, idle, gap)",
    ["cause"],
)
OPEN_WINDOWS = Gauge("rollcast_ingest_open_windows", "Windows held open in memory")
CHECKPOINTS = Counter("rollcast_ingest_checkpoints_total", "Checkpoints committed")
CONSUMER_LAG = Gauge("rollcast_ingest_consumer_lag", "Messages behind the partition's end", ["partition"])
WATERMARK = Gauge("rollcast_ingest_watermark_ms", "Event-time watermark of a partition", ["partition"])
