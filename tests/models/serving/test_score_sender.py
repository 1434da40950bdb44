"""The forecast job's score sender (models.serving.score_sender), without a broker: the producer is scripted
(``ScriptedProducer`` records what is sent and when a confirm ran, and can be told to fail) and the scored
batches are stand-ins with the surface the sender reads (``messages()``, ``totals()``)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from models.serving.score_sender import ScoreSender
from pipeline.config import Settings, load_settings
from pipeline.errors import BrokerUnavailable


class ScriptedProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list]] = []
        self.confirmed: list[int] = []  # messages sent when each confirm ran
        self.fail_confirm = False
        self.closed = False

    def send(self, topic: str, messages: list) -> None:
        self.sent.append((topic, list(messages)))

    def confirm(self, topic: str, timeout_s: float) -> None:
        self.confirmed.append(sum(len(m) for _, m in self.sent))
        if self.fail_confirm:
            raise BrokerUnavailable(f"messages to {topic!r} not delivered")

    def close(self, timeout_s: float) -> None:
        self.closed = True


class Scored:
    """A batch's scores (the surface of models.scoring.scorer.Emitted the sender reads); ``gate`` holds the
    build until it is set, ``error`` makes it fail."""

    def __init__(self, *series: str, gate: threading.Event | None = None, error: Exception | None = None,
                 anomalies: tuple[str, ...] = ()):
        self.series, self.gate, self.error, self.anomalies = series, gate, error, anomalies

    def anomaly_messages(self) -> list[tuple[str, bytes]]:
        return [(s, f'{{"anomaly":"{s}"}}'.encode()) for s in self.anomalies]

    def messages(self) -> list[tuple[str, bytes]]:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.error is not None:
            raise self.error
        return [(s, f'{{"series":"{s}"}}'.encode()) for s in self.series]

    def totals(self) -> list:
        return []


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env={"ROLLCAST_DATA_DIR": str(tmp_path), "ROLLCAST_TOPICS__SCORES": "scores",
                                  "ROLLCAST_TOPICS__ANOMALIES": "anomalies"})


def test_submit_returns_before_the_messages_are_built_and_confirm_waits_for_them(settings: Settings) -> None:
    producer, gate = ScriptedProducer(), threading.Event()
    sender = ScoreSender(settings, producer)
    sender.submit(Scored("a", "b", gate=gate), {"a": 0, "b": 1})
    assert producer.sent == []  # still building: the caller did not wait
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (sender.confirm(), done.set()))
    waiter.start()
    assert not done.wait(0.3)  # confirm waits for the build and the send
    gate.set()
    waiter.join(10)
    assert done.is_set()
    assert producer.sent == [("scores", [(b"a", b'{"series":"a"}', 0), (b"b", b'{"series":"b"}', 1)])]
    assert producer.confirmed == [2]  # the broker's confirmation came after both were sent
    sender.close(1.0)
    assert producer.closed


def test_a_failed_score_fails_every_later_confirm_and_submit(settings: Settings) -> None:
    producer = ScriptedProducer()
    sender = ScoreSender(settings, producer)
    sender.submit(Scored("a", error=ValueError("no text for it")), {"a": 0})
    with pytest.raises(ValueError):
        sender.confirm()
    # the state in memory now covers a score the broker never got: no later save may go through
    with pytest.raises(ValueError):
        sender.confirm()
    with pytest.raises(ValueError):
        sender.submit(Scored("b"), {"b": 0})
    sender.close(1.0)


def test_a_confirm_the_broker_refuses_is_sticky(settings: Settings) -> None:
    producer = ScriptedProducer()
    sender = ScoreSender(settings, producer)
    sender.submit(Scored("a"), {"a": 0})
    producer.fail_confirm = True
    with pytest.raises(BrokerUnavailable):
        sender.confirm()
    producer.fail_confirm = False
    with pytest.raises(BrokerUnavailable):
        sender.confirm()
    sender.close(1.0)


def test_anomalies_go_to_their_topic_with_the_scores_and_are_confirmed_with_them(settings: Settings) -> None:
    producer = ScriptedProducer()
    sender = ScoreSender(settings, producer)
    sender.submit(Scored("a", anomalies=("b",)), {"a": 0}, {"b": 2})
    sender.confirm()
    assert producer.sent == [("scores", [(b"a", b'{"series":"a"}', 0)]),
                             ("anomalies", [(b"b", b'{"anomaly":"b"}', 2)])]
    assert producer.confirmed == [2]
    sender.submit(Scored(anomalies=("c",)), {}, None)  # flagged, but no partitions given: a bug, raised
    with pytest.raises(ValueError, match="partitions"):
        sender.confirm()
    sender.close(1.0)
