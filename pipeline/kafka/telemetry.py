"""Prometheus metrics of rollcast's Kafka clients, as module-level objects.

They live in prometheus-client's default registry (``REGISTRY``), so a job
exposes them with its own metrics (``prometheus_client.start_http_server(port)``).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter

__all__ = ["REGISTRY", "CORRUPT_BATCHES"]

CORRUPT_BATCHES = Counter(
    "rollcast_corrupt_batches_total",
    "Fetched record batches that failed their checks (CRC) on kafka.corrupt_batch_attempts fetches in a row, "
    "by what kafka.on_corrupt_batch did: stop (the job ended) or skip (one skip, the batch or one offset of it)",
    ["action"],
)
