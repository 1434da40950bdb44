"""A rejected record too big for the DLQ topic once rollcast's headers are added does not stall ingest:
its dead letter is sent cut to fit, and the job goes on to window what follows.

The test broker (tansu) has no message size limit: it stored a 15 MB record whole when tried. So this
test cannot make the broker refuse the whole dead letter; it checks the rule against the configured
limit (``kafka.dlq_max_message_bytes``, set to 200,000 here through the job's environment, so the
value would pass uncut under the default of 1,000,000): the record on the DLQ topic is no bigger than
that, as kafka-python's producer measures a record, and carries the size and SHA-256 of the original.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from kafka.record.default_records import DefaultRecordBatchBuilder

from pipeline.config import load_settings
from pipeline.ingest.dlq import MARGIN
from pipeline.store import HistoryStore
from tests.support import read_topic
from tests.support.ingest import INGEST_ENV, ingest_child, produce_raw, wait_exit

pytestmark = [pytest.mark.slow, pytest.mark.fault]

T = 1_700_000_000_000


def test_a_rejected_value_near_the_limit_reaches_the_dlq_cut_to_fit_and_ingest_goes_on(settings, test_env, tmp_path):
    env = {**test_env, "ROLLCAST_KAFKA__DLQ_MAX_MESSAGE_BYTES": "200000"}
    s = load_settings(env={**env, **INGEST_ENV})
    limit = s.kafka.dlq_max_message_bytes
    assert limit == 200_000
    bad = (b"not json, " * (limit // 10 + 1))[: limit - 100]  # fits the topic alone, not with the headers
    good = [json.dumps({"series": "g", "ts": T + dt, "value": v}).encode() for dt, v in ((0, 1.0), (100, 2.0),
                                                                                        (3000, 3.0))]
    [(partition, offset), *_] = produce_raw(s, [(bad, b"g", [("trace", b"t1")])] + [(v, b"g", []) for v in good])

    child = ingest_child(env, tmp_path, "ingest", "--exit-when-idle", "3")
    try:
        assert wait_exit(child, 90) == 0, child.tail(30)
    finally:
        child.stop()

    [dead] = read_topic(s, s.topics.dlq, timeout=30)
    h = dict(dead.headers)
    assert (h["rollcast-reason"], h["rollcast-truncated"]) == (b"malformed_json", b"true")
    assert int(h["rollcast-original-size"]) == len(bad)
    assert h["rollcast-value-sha256"].decode() == hashlib.sha256(bad).hexdigest()
    assert (int(h["rollcast-source-partition"]), int(h["rollcast-source-offset"])) == (partition, offset)
    assert bad.startswith(dead.value) and len(dead.value) > limit - MARGIN - 2000
    assert (dead.key, h["trace"]) == (b"g", b"t1")
    assert DefaultRecordBatchBuilder.estimate_size_in_bytes(dead.key, dead.value, dead.headers) <= limit - MARGIN

    windows = HistoryStore(s).read()
    first = windows.filter((windows["series"] == "g") & (windows["window_start"] == T)).to_dicts()
    assert [(w["count"], w["sum"]) for w in first] == [(2, 3.0)]  # the observations after it were windowed
