"""The ingestor's worker thread against the real broker: checkpoints run there, commits do not."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.config import load_settings
from pipeline.ingest.ingestor import Ingestor
from pipeline.kafka.clients import make_consumer, make_producer
from pipeline.store import HistoryStore
from tests.support.ingest import (
    INGEST_ENV,
    assert_frames_equal,
    make_observations,
    produce,
    progress_positions,
    reference,
)

pytestmark = pytest.mark.slow


def _loop(ingestor: Ingestor, consumer, until: callable, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the ingestor did not get there in time"
        batch = consumer.poll(timeout_ms=100, max_records=500)  # small polls: many tasks in flight
        ingestor.submit(batch)
        ingestor.maybe_checkpoint()


def test_offsets_are_committed_by_the_polling_thread_only_after_the_store_holds_them(settings, test_env):
    s = load_settings(env={**test_env, **INGEST_ENV})
    sent = produce(s, make_observations(6000, series=6, seed=5))
    consumer, producer = make_consumer(s, s.groups.ingest), make_producer(s)
    store = HistoryStore(s)
    ingestor = Ingestor(s, consumer, producer, checkpoint_interval_s=0.0)
    commits: list[tuple[str, bool, dict[int, int], dict[int, int]]] = []
    commit_offsets = ingestor.checkpointer.commit_offsets

    def recording(offsets, blocking=True):
        durable = progress_positions(store, s.topics.observations, s.kafka.partitions)
        committed = {tp.partition: om.offset for tp, om in offsets.items()}
        commits.append((threading.current_thread().name, blocking, committed, durable))
        commit_offsets(offsets, blocking)

    ingestor.checkpointer.commit_offsets = recording
    consumer.subscribe([s.topics.observations], listener=ingestor.listener())
    try:
        _loop(ingestor, consumer, lambda: ingestor.messages == len(sent))
        ingestor.close_idle()
        ingestor.checkpoint()
    finally:
        ingestor.close()
        consumer.close(autocommit=False)
        producer.close()
    assert sum(blocking for _, blocking, _, _ in commits) > 3  # checkpoints committed by the loop
    for thread, blocking, committed, durable in commits:
        # the polling thread commits synchronously; a rebalance callback (kafka-python's IO thread,
        # here at consumer.close()) asynchronously; the window worker never touches the consumer
        assert (thread == threading.main_thread().name) == blocking, (thread, blocking)
        assert not thread.startswith("ingest-window")
        for p, offset in committed.items():
            assert offset <= durable[p], (committed, durable)
    assert_frames_equal(store.read(), reference(sent))


def test_nothing_runs_in_the_worker_after_a_task_failed(settings, test_env, monkeypatch):
    s = load_settings(env={**test_env, **INGEST_ENV})
    produce(s, make_observations(2000, series=4, seed=6))
    consumer, producer = make_consumer(s, s.groups.ingest), make_producer(s)
    ingestor = Ingestor(s, consumer, producer, checkpoint_interval_s=0.0)
    decode, calls = ingestor.decoder.decode, []

    def failing(records):
        calls.append(len(records))
        if len(calls) == 3:
            raise ValueError("a bug in decoding")
        return decode(records)

    monkeypatch.setattr(ingestor.decoder, "decode", failing)
    durable_calls = []
    make_durable = ingestor.checkpointer.make_durable
    monkeypatch.setattr(ingestor.checkpointer, "make_durable", lambda runs: durable_calls.append(1) or make_durable(runs))
    consumer.subscribe([s.topics.observations], listener=ingestor.listener())
    try:
        with pytest.raises((ValueError, RuntimeError)):
            _loop(ingestor, consumer, lambda: False)
        before = len(durable_calls)
        with pytest.raises(RuntimeError):
            ingestor.checkpoint()  # neither what was queued behind the failure nor a new checkpoint runs
        ingestor.revoke([0, 1])  # as consumer.close() does: nothing is checkpointed
        assert len(durable_calls) == before
    finally:
        ingestor.close()
        consumer.close(autocommit=False)
        producer.close()
    assert len(calls) == 3  # no poll was decoded after the failing one
