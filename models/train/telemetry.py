"""Prometheus metrics of the train job, as module-level objects.

They live in prometheus-client's default registry, so the job's metrics endpoint
(:func:`pipeline.observability.serve_http`) exposes them with the rest.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = ["CYCLES", "LAST_SUCCESS", "CHAMPION_VERSION"]

CYCLES = Counter("rollcast_train_cycles_total", "Training cycles by outcome", ["outcome"])
LAST_SUCCESS = Gauge("rollcast_train_last_success_timestamp_seconds", "End of the last successful cycle")
CHAMPION_VERSION = Gauge("rollcast_train_champion_version", "Registered version carrying the champion alias")
