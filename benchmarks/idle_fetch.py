"""What an idle consumer and the embedded broker cost at a given ``kafka.fetch_max_wait_ms``.

tansu holds every fetch for the full wait, so a consumer polling an empty topic sends a fetch every
``wait`` ms. For each wait in ``--waits`` (interleaved, ``--repeat`` times) this starts a fresh tansu, one
kafka-python consumer in a group on an empty topic, lets it settle for 5 s, then measures the CPU of the
broker process and of this (the consumer's) process over ``--seconds`` of polling, as a share of one core.

    python benchmarks/idle_fetch.py --waits 100 20 5 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pipeline import processes
from pipeline.config import load_settings
from pipeline.kafka.clients import ensure_topics, make_consumer


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waits", type=int, nargs="+", default=[100, 20, 5])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rollcast-idle-"))
    print("| fetch wait (ms) | broker, % of a core | consumer, % of a core |")
    print("|---|---|---|")
    for run in range(args.repeat):
        for wait in args.waits:
            bootstrap, broker = processes.broker_unless_given(None, work / f"broker-{wait}-{run}")
            assert broker is not None
            try:
                settings = load_settings(env={"ROLLCAST_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                                              "ROLLCAST_KAFKA__FETCH_MAX_WAIT_MS": str(wait),
                                              "ROLLCAST_DATA_DIR": str(work)})
                ensure_topics(settings)
                consumer = make_consumer(settings, f"idle-{wait}-{run}")
                consumer.subscribe([settings.topics.windows])
                settle = time.monotonic() + 5
                while time.monotonic() < settle:  # joined and fetching
                    consumer.poll(100)
                b0, c0, t0 = cpu_s(broker.proc.pid), time.process_time(), time.monotonic()
                while time.monotonic() - t0 < args.seconds:
                    assert not consumer.poll(200), "the topic is empty"
                b1, c1, t1 = cpu_s(broker.proc.pid), time.process_time(), time.monotonic()
                consumer.close()
            finally:
                broker.stop()
            print(f"| {wait} | {100 * (b1 - b0) / (t1 - t0):.1f} | {100 * (c1 - c0) / (t1 - t0):.1f} |", flush=True)


if __name__ == "__main__":
    main()
