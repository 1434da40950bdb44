"""What every long-running rollcast process shares: shutdown on a signal, sessions retried after an
outage, and the memory and garbage-collector tuning of a process that lives for weeks.

- :class:`Shutdown` is the one way a job learns that it should stop. SIGTERM or SIGINT set it (an
  :class:`threading.Event`, so it can be waited on and passed to code that checks it), start the
  ``observability.shutdown_timeout_s`` deadline after which the process exits anyway, and, for a
  supervisor that blocks in start-up waits (``rollcast up``), can also raise :class:`Stopped`.
- :func:`retry_sessions` runs a job's consumer session again after a broker or store outage, with a
  growing pause and one warning per outage.
- :func:`keep_freed_heap` and :func:`freeze_heap` keep a serving process's inference free of page
  faults and long garbage-collector pauses.
"""

from __future__ import annotations

import logging
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rollcast.runtime")


class Stopped(Exception):
    """Raised in the main thread by a :class:`Shutdown` made with ``raise_in_main=True``."""


class Shutdown(threading.Event):
    """Set by SIGTERM or SIGINT (or :meth:`set`); the job finishes what it is doing, makes what it
    holds durable, and exits.

    ``timeout_s``: the first signal also starts a timer that exits the process with status 1 after
    that long, so a job stuck in a broker call cannot outlive its supervisor's patience.
    ``raise_in_main``: the handler also raises :class:`Stopped`, which interrupts a blocking wait in
    the main thread (a supervisor waiting for its children to start).
    """

    def __init__(self, job: str, timeout_s: float | None = None, *, raise_in_main: bool = False) -> None:
        super().__init__()
        self.job = job
        self.timeout_s = timeout_s
        self.raise_in_main = raise_in_main
        self.signum: int | None = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    @property
    def requested(self) -> bool:
        return self.is_set()

    def _on_signal(self, signum: int, frame: object) -> None:
        from pipeline.observability import exit_after

        first = not self.is_set()
        log.info("%s: signal %d; finishing the current step", self.job, signum)
        if first and self.timeout_s is not None:
            exit_after(self.timeout_s, self.job)
        self.signum = signum
        self.set()
        if self.raise_in_main and first:
            raise Stopped()

    def ignore_further_signals(self) -> None:
        """During clean-up: a second SIGTERM must not cut it short."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def retry_sessions(
    session: Callable[[], Any],
    *,
    job: str,
    shutdown: threading.Event,
    health: Any,
    errors: tuple[type[BaseException], ...],
    resuming: str,
    before_retry: Callable[[], None] | None = None,
) -> bool:
    """Run ``session()`` until it returns; after one of ``errors`` (a broker or history-store outage),
    pause (1 s, 2 s, 4 s, ... up to 30 s) and run it again.

    Any other error ends the job: :class:`~pipeline.errors.CorruptBatch` (a record batch that failed its
    checks on every fetch) is a :class:`~pipeline.errors.RollcastError`, never a Kafka error, because a new
    session would fetch the same bytes and fail the same way, forever.

    ``resuming`` says in the warning what the job does about the failed session (rewinds, rebuilds);
    ``before_retry`` runs before every retry (topics the broker lost are created again). One warning
    per outage; retries log at debug. Returns False when a session failed after ``shutdown`` was set
    (its last work could not be made durable: a restart redoes it), True otherwise.
    """
    from pipeline.errors import StoreUnavailable
    from pipeline.kafka.clients import Backoff

    logger = logging.getLogger(f"rollcast.{job}")
    backoff, failing = Backoff(), False
    while True:
        try:
            if failing and before_retry is not None:
                before_retry()
            session()
            return True
        except errors as e:
            fatal = _rollcast_cause(e)
            if fatal is not None:  # a rebalance callback's own error, which kafka-python wraps in a KafkaError
                raise fatal from e
            health.facts["last_error"] = f"{type(e).__name__}: {e}"
            if shutdown.is_set():
                logger.error("could not finish the last step while stopping (%s); a restart redoes the "
                             "unfinished work", e)
                return False
            if not failing:
                what = "history store" if isinstance(e, StoreUnavailable) else "Kafka"
                logger.warning("%s error in the %s loop (%s: %s); %s", what, job, type(e).__name__, e, resuming)
            else:
                logger.debug("still failing: %s", e)
            failing = True
            backoff.sleep(shutdown.is_set)
            if shutdown.is_set():
                return True  # the failed session held nothing that was not durable


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True if ``url`` answers 2xx within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - local health checks
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def keep_freed_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse freed memory for the next inference instead of returning it to the OS.

    Every inference allocates and frees tensors of a few MB. With glibc's defaults those come from
    fresh ``mmap`` regions or a heap top that ``free`` trims back to the OS, so each call faults its
    pages in again, which made TCN inference in the job more than twice as slow as with these
    thresholds (figures in BENCHMARKS.md). Memory then stays at the largest batch's working set
    instead of shrinking between batches. No-op (False) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def freeze_heap() -> int:
    """Collect garbage once, then exempt every object alive now (imported modules, the model, the buffers)
    from later collections, and make sure the collector is on (``rollcast`` starts with it off, see
    :func:`jobs.cli.collector_off_during_start_up`); return how many objects are exempt.

    The job holds a few hundred thousand long-lived objects (torch, polars, MLflow, the model), and every
    full (generation 2) collection walked all of them: a stall of one batch every time allocations
    trigger it (BENCHMARKS.md). After :func:`gc.freeze` a collection walks only objects created
    since. Frozen objects are still freed by reference counting; only cycles among them are kept.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.enable()
    return gc.get_freeze_count()


def _rollcast_cause(e: BaseException) -> BaseException | None:
    """The error of a rebalance callback that ``e`` wraps when it is one of rollcast's own and not an outage
    (e.g. :class:`~pipeline.store.TopicIncarnationChanged`): kafka-python re-raises a listener's exception
    from ``poll()`` as ``KafkaError("User rebalance callback throws an error")``, which would otherwise be
    retried as a Kafka outage, forever."""
    from pipeline.errors import BrokerUnavailable, RollcastError, StoreUnavailable

    cause = e.__cause__
    if isinstance(cause, RollcastError) and not isinstance(cause, StoreUnavailable | BrokerUnavailable):
        return cause
    return None
