"""Decoder cost alone (no Kafka): :meth:`pipeline.ingest.decode.Decoder.decode` on polls of valid input.

    python benchmarks/decode.py --polls 200 --poll-records 400 --arrow-rows 100000 --repeat 7

JSON: polls of POLL_RECORDS messages (as ``rollcast ingest`` gets them from
``max_poll_records``); Arrow: one IPC message of ARROW_ROWS rows per call.
Prints the best of REPEAT passes (the least disturbed on a shared machine) as
microseconds per poll / per Arrow message and observations per second. Run it
against two checkouts (``PYTHONPATH=<tree>``) to compare their hot paths under
the same load; ``benchmarks/ingest.py`` measures the whole loop.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

from benchmarks.ingest import observations
from pipeline.config import FieldSettings
from pipeline.ingest.decode import Decoder
from pipeline.kafka.headers import ARROW_CONTENT_TYPE
from pipeline.windows_io import encode_windows


def _best(fn, calls: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--poll-records", type=int, default=400)
    ap.add_argument("--arrow-rows", type=int, default=100_000)
    ap.add_argument("--arrow-messages", type=int, default=10)
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    decoder = Decoder(FieldSettings(), 0, 4_102_444_800_000)
    n = args.polls * args.poll_records
    df = observations(n, args.series)
    lines = df.write_ndjson().encode().splitlines()
    polls = []
    for p in range(args.polls):
        chunk = lines[p * args.poll_records : (p + 1) * args.poll_records]
        polls.append(
            [
                SimpleNamespace(
                    topic="obs", partition=0, offset=p * args.poll_records + i, key=None, value=v, headers=[]
                )
                for i, v in enumerate(chunk)
            ]
        )
    json_s = _best(lambda i: decoder.decode(polls[i]), args.polls, args.repeat)
    adf = observations(args.arrow_rows * args.arrow_messages, args.series, seed=1)
    header = [("content-type", ARROW_CONTENT_TYPE.encode())]
    arrow = [
        [
            SimpleNamespace(
                topic="obs",
                partition=0,
                offset=m,
                key=None,
                headers=header,
                value=encode_windows(adf.slice(m * args.arrow_rows, args.arrow_rows)),
            )
        ]
        for m in range(args.arrow_messages)
    ]
    arrow_s = _best(lambda i: decoder.decode(arrow[i]), args.arrow_messages, args.repeat)
    print(
        f"json: {json_s * 1e6:,.0f} us per {args.poll_records}-record poll ({args.poll_records / json_s:,.0f} obs/s); "
        f"arrow: {arrow_s * 1e6:,.0f} us per {args.arrow_rows}-row message ({args.arrow_rows / arrow_s:,.0f} obs/s); "
        f"best of {args.repeat}"
    )


if __name__ == "__main__":
    main()
