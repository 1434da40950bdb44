"""What the jobs ask the Kafka client about the group and the topics beyond kafka-python's public API.

Two facts are needed to fence the history store's writes (:mod:`pipeline.store`):

- a topic's *incarnation*: Kafka's topic ID (KIP-516, brokers since 2.8, Metadata v10+). Deleting a
  topic and creating it again under the same name gives it a new ID and offsets that start again at 0;
  an in-memory broker (the embedded stack's tansu) gives every topic a new ID at each start. A progress
  record that counts offsets of another ID must not be resumed from.
- a way to rejoin the group at once after this process found that another one owns a partition it still
  thinks its own (its store write was fenced): waiting for the next heartbeat to fail would let it keep
  processing records whose results the store refuses.

kafka-python keeps both in its cluster metadata and coordinator; these functions read them where they
exist and answer None / do nothing elsewhere, so a client without them only loses the check, never data.
"""

from __future__ import annotations

from typing import Any


def topic_id(consumer: Any, topic: str) -> str | None:
    """The topic ID of ``topic`` in the consumer's metadata (a UUID string), or None when the broker does
    not send IDs (Kafka < 2.8) or the client does not keep them. Read in a rebalance callback: the
    metadata that produced the assignment names the topic's current partitions, so its ID is current."""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    if cluster is None or not hasattr(cluster, "topic_id"):
        return None
    found = cluster.topic_id(topic)
    if found is None or int(found) == 0:  # the all-zero UUID is Kafka's "no ID"
        return None
    return str(found)


def request_rejoin(consumer: Any) -> bool:
    """Make the consumer rejoin its group at its next poll (its partitions are revoked, or lost, and
    assigned again by the group). Returns whether the client could be asked."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "request_rejoin"):
        return False
    coordinator.request_rejoin()
    return True
