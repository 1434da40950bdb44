"""Logging set-up: plain text for people, one JSON object per line for machines."""

from __future__ import annotations

import json
import logging
import sys
import time

from pipeline.config import ObservabilitySettings


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with any ``extra={...}`` fields merged in."""

    _skip = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(obs: ObservabilitySettings) -> None:
    """Configure the root logger once for a process."""
    handler = logging.StreamHandler(sys.stderr)
    if obs.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(obs.log_level)
    # kafka-python logs every reconnect at ERROR; our own code reports outages once, clearly.
    logging.getLogger("kafka").setLevel(logging.CRITICAL if obs.log_level != "DEBUG" else logging.DEBUG)
    # urllib3 logs every MLflow HTTP retry; the jobs report an MLflow outage once themselves.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    for noisy in ("alembic", "matplotlib", "lightning", "pytorch_lightning", "mlflow"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
