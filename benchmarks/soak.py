"""Memory soak: ingest at a steady rate for --minutes and sample the process RSS.

    python benchmarks/soak.py --minutes 2 --rate 5000 --series 500

Starts its own tansu broker (unless --bootstrap), a producer thread sending
JSON observations at --rate obs/s with advancing event time, and the ingest
session of `rollcast ingest` (:func:`pipeline.ingest.session.consume_session`) in this process; prints RSS and open windows every --sample-s.
Open state should stay flat (series x open windows), not grow with messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pipeline import processes
from pipeline.config import load_settings
from pipeline.ingest.session import Totals, consume_session
from pipeline.kafka.clients import ensure_topics, make_producer


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--rate", type=int, default=5000, help="observations per second")
    ap.add_argument("--series", type=int, default=500)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--bootstrap")
    args = ap.parse_args()
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    tmp = Path(tempfile.mkdtemp(prefix="rollcast-soak-"))
    bootstrap, broker = processes.broker_unless_given(args.bootstrap, tmp / "logs")
    tag = uuid.uuid4().hex[:6]
    s = load_settings(env={
        "ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "ROLLCAST_DATA_DIR": str(tmp / "data"),
        "ROLLCAST_WINDOW__LENGTH_MS": "1000", "ROLLCAST_WINDOW__LATENESS_MS": "200",
        "ROLLCAST_TOPICS__OBSERVATIONS": f"soak-{tag}", "ROLLCAST_TOPICS__DLQ": f"soak-dlq-{tag}",
        "ROLLCAST_TOPICS__WINDOWS": f"soak-win-{tag}", "ROLLCAST_GROUPS__INGEST": f"soak-{tag}",
    })
    ensure_topics(s, [s.topics.observations, s.topics.dlq, s.topics.windows])
    stop = threading.Event()
    sent = [0]

    def produce() -> None:
        producer = make_producer(s)
        t_event = 1_700_000_000_000
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * args.rate)
            while sent[0] < due:
                i = sent[0]
                t_event += 1
                obs = {"series": f"s{i % args.series}", "ts": t_event, "value": float(i % 97)}
                producer.send(s.topics.observations, json.dumps(obs).encode(), key=obs["series"].encode())
                sent[0] += 1
            time.sleep(0.01)
        producer.flush()
        producer.close()

    threading.Thread(target=produce, daemon=True).start()
    # the session `rollcast ingest` runs, sampled after each poll
    end = time.monotonic() + args.minutes * 60
    next_sample = [time.monotonic()]
    samples: list[float] = []

    def on_poll(_batch: dict, ing: object) -> None:
        now = time.monotonic()
        if now >= next_sample[0]:
            open_w = sum(r.state.n_open for r in ing.runs.values())
            samples.append(rss_mb())
            print(f"t={args.minutes * 60 - (end - now):6.0f}s sent={sent[0]:>9} processed={ing.messages:>9} "
                  f"open_windows={open_w:>5} rss={samples[-1]:.0f} MiB", flush=True)
            next_sample[0] = now + args.sample_s

    totals = Totals()
    try:
        consume_session(s, stop, totals, on_poll=on_poll, until=lambda _ing: time.monotonic() >= end)
    finally:
        stop.set()
        if broker is not None:
            broker.stop()
    print(f"soak: {args.minutes:g} min at {args.rate} obs/s, {totals.messages} processed, "
          f"RSS first {samples[0]:.0f} MiB, max {max(samples):.0f} MiB, last {samples[-1]:.0f} MiB")


if __name__ == "__main__":
    main()
