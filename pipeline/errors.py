"""The project's exception hierarchy.

Every error rollcast raises on purpose derives from :class:`RollcastError`, so
a caller can catch the project's errors without catching bugs. Subclasses are
narrow, one per thing a caller can act on, and their messages say what was
wrong and what to do about it.
"""

from __future__ import annotations


class RollcastError(Exception):
    """Root of every error rollcast raises on purpose; ``exit_code`` is the status ``rollcast`` exits with."""

    exit_code = 1


class ConfigError(RollcastError):
    """Settings are invalid; ``problems`` lists every one of them."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in self.problems))


class BrokerUnavailable(RollcastError):
    """The Kafka bootstrap servers could not be reached in time."""


class CorruptBatch(RollcastError):
    """A record batch failed its checks (CRC) on every one of ``kafka.corrupt_batch_attempts`` fetches and
    ``kafka.on_corrupt_batch`` is ``stop``. Not an outage: fetching again gets the same bytes, so the job
    ends (exit code 4) instead of retrying, and says where the batch is."""

    exit_code = 4


class MlflowUnavailable(RollcastError):
    """The MLflow tracking server could not be reached in time."""


class StoreUnavailable(RollcastError, OSError):
    """The history store could not be read or written: an object store outage, a full or failing disk.
    Nothing it did not make durable counts as written; the jobs retry. An ``OSError`` too, as the
    error it wraps was."""


class StackStartError(RollcastError):
    """A child process of the embedded stack failed to start or become healthy."""


class DatasetError(RollcastError):
    """A dataset file cannot be read or lacks the mapped columns."""


class ModelConfigError(RollcastError):
    """A model name is unknown or its configuration is invalid."""


class NotEnoughData(RollcastError):
    """The history is too short for the configured context and horizon."""


class PromotionRefused(RollcastError):
    """A model version may not carry the champion alias (it failed validation)."""
