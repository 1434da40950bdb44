"""pipeline.runtime: the heap helpers of long-running processes, and how sessions are retried."""

from __future__ import annotations


def test_freeze_heap_exempts_the_objects_alive_at_start_from_collection() -> None:
    import gc

    from pipeline.runtime import freeze_heap

    try:
        frozen = freeze_heap()
        # this process's imports (torch, polars, ...); the count only falls later, as frozen objects
        # are freed (a daemon thread of an earlier test dropping its last references)
        assert 10_000 < gc.get_freeze_count() <= frozen
        assert len(gc.get_objects()) < frozen / 10  # a full collection now walks only what came later
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_a_rebalance_callbacks_own_error_ends_the_sessions_and_an_outage_in_one_is_retried() -> None:
    """kafka-python re-raises a rebalance listener's exception from ``poll()`` wrapped in a ``KafkaError``:
    rollcast's own error inside (a topic of another incarnation with ``kafka.on_new_topic = "stop"``) ends the
    job, a store outage inside is retried like any other."""
    import threading
    from types import SimpleNamespace

    import pytest
    from kafka.errors import KafkaError

    from pipeline.errors import BrokerUnavailable, StoreUnavailable
    from pipeline.runtime import retry_sessions
    from pipeline.store import TopicIncarnationChanged

    def wrapped(cause: Exception) -> KafkaError:
        try:
            raise KafkaError("User rebalance callback throws an error") from cause
        except KafkaError as e:
            return e

    causes = [StoreUnavailable("history store down"), TopicIncarnationChanged("obs[0]: kafka.on_new_topic")]
    calls = []

    def session() -> None:
        calls.append(1)
        raise wrapped(causes[len(calls) - 1])

    with pytest.raises(TopicIncarnationChanged, match="on_new_topic"):
        retry_sessions(session, job="ingest", shutdown=threading.Event(), health=SimpleNamespace(facts={}),
                       errors=(KafkaError, BrokerUnavailable, StoreUnavailable), resuming="resuming")
    assert len(calls) == 2
