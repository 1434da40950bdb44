#!/usr/bin/env python
"""Coverage-guided fuzzer (atheris/libFuzzer) for :class:`pipeline.ingest.decode.Decoder` as a pure function.

    python tests/support/fuzz_decode.py -max_total_time=600 tests/pipeline/ingest/fuzz_corpus/work   # make fuzz

One input is turned (:func:`build_case`) into field names for ``[fields]``
and a poll batch of 1-8 records: JSON built from a template and then
mutated (wrong types, missing or doubled fields, invalid UTF-8, lone surrogate
escapes, deep nesting, NaN, huge numbers) or raw bytes, and Arrow IPC streams
of random schemas (string, large/view strings, dictionaries, integers,
floats, timestamps, binary, nested and null columns, invalid UTF-8 viewed as
strings) then maybe corrupted, each record with random headers (keys
that are not UTF-8 come as the patched consumer gives them, see
:func:`pipeline.kafka.clients.header_key`).
:func:`check` then asserts the decoder's contract:

- it raises nothing, and no record is ``undecodable`` (that reason means a
  guard is missing: a finding to fix);
- every record is windowed, rejected with a known reason, or (Arrow) split
  between the two; nothing is lost or counted twice;
- events have the event schema, valid UTF-8 series, finite values and
  timestamps in range, and a :class:`~pipeline.windows.WindowState` takes them;
- a record's fate does not depend on its neighbours: decoding the batch gives
  the same events and rejections as decoding each record alone;
- every rejection can be produced to the DLQ (kafka-python's record encoder
  takes its key, value and headers).

A crashing input is written by libFuzzer as ``crash-<sha1>``; copy it into
``tests/pipeline/ingest/fuzz_corpus/regressions/``, where ``test_decode.py``
replays every file through :func:`check`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from kafka.consumer.fetcher import ConsumerRecord
from kafka.record.default_records import DefaultRecordBatchBuilder

from pipeline.config import FieldSettings
from pipeline.ingest.decode import EVENT_SCHEMA, REASONS, UNDECODABLE, Decoder
from pipeline.ingest.dlq import DeadLetters
from pipeline.kafka.headers import ARROW_CONTENT_TYPE, header_key
from pipeline.windows import TumblingWindow, WindowState

MIN_TS, MAX_TS = 0, 4_102_444_800_000
NAMES = [
    "series",
    "ts",
    "value",
    "symbol",
    "time",
    "price",
    "s",
    "",
    "é",
    "x y",
    "a\x00b",
    "\U0001f600",
    "id",
]


class _Source:
    """Draws from the fuzzer's bytes (atheris' FuzzedDataProvider, without needing atheris to replay)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, n: int) -> int:
        """0 <= i < n."""
        v = self.byte() | self.byte() << 8
        return v % n if n > 0 else 0

    def pick(self, seq: list[Any]) -> Any:
        return seq[self.int(len(seq))]

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def chunk(self, limit: int = 64) -> bytes:
        return self.bytes(self.int(limit + 1))

    def text(self, limit: int = 16) -> str:
        return self.chunk(limit).decode("utf-8", "replace")

    def number(self) -> Any:
        kind = self.int(9)
        if kind == 0:
            return 1_700_000_000_000 + self.int(100_000) * 7
        if kind == 1:
            return (self.int(65536) - 32768) * 10 ** self.int(25)  # beyond int64 too
        if kind == 2:
            return float(self.int(65536)) / (1 + self.int(100))
        if kind == 3:
            return self.pick([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 2**63, -(2**63) - 1])
        if kind == 4:
            return self.pick([True, False, None])
        if kind == 5:
            return self.text()
        if kind == 6:
            return self.pick(
                [
                    "2023-11-14T22:13:20Z",
                    "2023-11-14",
                    "2023-11-14 22:13:20.5",
                    "2023-11-14T22:13:20+05:30",
                    "99999-01-01",
                    "yesterday",
                    "",
                ]
            )
        if kind == 7:
            return [self.number()] if self.int(4) else {"k": self.text()}
        return self.int(100) - 50


def _json_value(src: _Source, f: FieldSettings) -> bytes:
    kind = src.int(12)
    if kind == 0:
        return src.chunk(200)
    if kind == 1:  # deep nesting, at the top or in a field pyarrow skips
        depth = src.pick([10, 999, 1001, 3000, 100_000])
        nest = b"[" * depth + b"]" * depth if src.int(2) else b'{"a":' * depth + b"1" + b"}" * depth
        if src.int(2):
            return nest
        return b'{"%s": "a", "%s": 1700000000000, "%s": 1.0, "deep": %s}' % (
            f.series.encode(),
            f.ts.encode(),
            f.value.encode(),
            nest,
        )
    obj: dict[str, Any] = {
        f.series: f"s{src.int(4)}",
        f.ts: 1_700_000_000_000 + src.int(50_000) * 10,
        f.value: src.int(1000) / 8,
    }
    for _ in range(src.int(3)):
        op = src.int(5)
        key = src.pick([f.series, f.ts, f.value, src.pick(NAMES)])
        if op == 0:
            obj.pop(key, None)
        elif op in (1, 2):
            obj[key] = src.number()
        elif op == 3:
            obj[key] = src.text()
        else:
            obj["extra"] = [src.number() for _ in range(src.int(4))]
    text = json.dumps(obj, ensure_ascii=bool(src.int(2)), allow_nan=True)
    if src.int(3) == 0:  # write the same field twice
        text = text[:-1] + f', "{src.pick([f.series, f.ts, f.value])}": {json.dumps(src.number())}' + "}"
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate from .text() stays as bad bytes
    op = src.int(10)
    if op == 0 and raw:  # overwrite some bytes (invalid UTF-8 in a string, a key, anywhere)
        for _ in range(1 + src.int(3)):
            i = src.int(len(raw))
            raw = (
                raw[:i]
                + bytes([src.pick([0xFF, 0xFE, 0xC0, 0x80, 0xED, 0x0A, 0x00, 0x22, 0x5C, src.byte()])])
                + raw[i + 1 :]
            )
    elif op == 1:
        raw = raw.replace(b'"s', b'"\\ud800s', 1)  # a lone surrogate escape in a string
    elif op == 2:
        raw = raw[: src.int(len(raw) + 1)]
    elif op == 3:
        raw = (
            src.pick([b"\xef\xbb\xbf", b"\xff\xfe", b" ", b"\n", b"\r\n", b""])
            + raw
            + src.pick([b"", b" x", b"\n", b"{}"])
        )
    elif op == 4:
        raw = raw.replace(b"1.0", b"NaN").replace(b"0.125", b"Infinity")
    return raw


def _arrow_column(src: _Source, n: int) -> pa.Array:
    kind = src.int(17)
    texts = [src.text(6) if src.int(8) else None for _ in range(n)]
    ints = [src.number() if src.int(2) else 1_700_000_000_000 + src.int(1000) for _ in range(n)]
    ints = [
        i if isinstance(i, int) and not isinstance(i, bool) and -(2**63) <= i < 2**63 else 0 for i in ints
    ]
    floats = [
        src.int(1000) / 4 if src.int(6) else src.pick([math.nan, math.inf, None, -1e308]) for _ in range(n)
    ]
    if kind == 0:
        return pa.array(texts, pa.string())
    if kind == 1:
        return pa.array(texts, pa.large_string())
    if kind == 2:
        return pa.array(texts, pa.string_view())
    if kind == 3:
        return pa.array(texts, pa.string()).dictionary_encode()
    if kind == 4:  # bytes that are not UTF-8, viewed as a string column without validation
        raw = [src.chunk(6) + b"\xff" if src.int(2) else b"ok" for _ in range(n)]
        arr = pa.array(raw, pa.binary()).view(pa.string())
        return arr.dictionary_encode() if src.int(3) == 0 else arr
    if kind == 5:
        return pa.array(ints, pa.int64())
    if kind == 6:
        return pa.array([i % 2**63 for i in ints], pa.uint64())
    if kind == 7:
        return pa.array([i % 128 for i in ints], pa.int8())
    if kind == 8:
        return pa.array(floats, pa.float64())
    if kind == 9:
        return pa.array(floats, pa.float32())
    if kind == 10:
        return pa.array(floats, pa.float64()).cast(pa.float16())
    if kind == 11:
        unit = src.pick(["s", "ms", "us", "ns"])
        return pa.array(ints, pa.int64()).cast(pa.timestamp(unit, tz=src.pick([None, "UTC", "Asia/Kolkata"])))
    if kind == 12:
        return pa.array([t.encode() if t else None for t in texts], pa.binary())
    if kind == 13:
        return pa.array([[i] for i in ints], pa.list_(pa.int64()))
    if kind == 14:
        return pa.array([{"a": t} for t in texts], pa.struct([("a", pa.string())]))
    if kind == 15:
        return pa.nulls(n)
    return pa.array(ints, pa.int64()).dictionary_encode()


def _arrow_value(src: _Source, f: FieldSettings) -> bytes:
    n = src.int(6)
    names = [f.series, f.ts, f.value]
    for _ in range(src.int(3)):
        op = src.int(3)
        if op == 0 and names:
            names.pop(src.int(len(names)))
        else:
            names.append(src.pick(names + NAMES) if op == 1 else src.text(8))
    table = pa.table({f"c{i}": _arrow_column(src, n) for i in range(len(names))}).rename_columns(names)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=src.pick([None, None, "lz4", "zstd"]))
    with pa.ipc.new_stream(sink, table.schema, options=options) as w:
        for batch in table.to_batches(max_chunksize=max(1, src.int(4))):
            w.write_batch(batch)
    raw = sink.getvalue().to_pybytes()
    op = src.int(6)
    if op == 0 and raw:
        for _ in range(1 + src.int(8)):
            i = src.int(len(raw))
            raw = raw[:i] + bytes([src.byte()]) + raw[i + 1 :]
    elif op == 1:
        raw = raw[: src.int(len(raw) + 1)]
    elif op == 2:
        raw = src.chunk(300)
    return raw


def _headers(src: _Source, arrow: bool) -> list[tuple[str, bytes | None]]:
    out: list[tuple[str, bytes | None]] = []
    for _ in range(src.int(3)):
        key = header_key(src.chunk(12))  # as the consumer reads it (pipeline.kafka.clients)
        out.append(
            (src.pick([key, "content-type", "Content-Type", "trace"]), src.pick([src.chunk(20), None]))
        )
    if arrow:
        out.insert(
            src.int(len(out) + 1), (src.pick(["content-type", "CONTENT-TYPE"]), ARROW_CONTENT_TYPE.encode())
        )
    return out


def build_case(data: bytes) -> tuple[FieldSettings, list[ConsumerRecord]]:
    """Field names and a poll batch (one partition, increasing offsets) drawn from ``data``."""
    src = _Source(data)
    while True:
        names = [src.pick(NAMES) for _ in range(3)] if src.int(4) == 0 else ["series", "ts", "value"]
        if len(set(names)) == 3:
            break
        names = ["series", "ts", "value"]
        break
    f = FieldSettings(series=names[0], ts=names[1], value=names[2])
    records = []
    offset = src.int(1000)
    for _ in range(1 + src.int(8)):
        arrow = src.int(4) == 0
        value = _arrow_value(src, f) if arrow else _json_value(src, f)
        if src.int(20) == 0:
            value = None
        key = src.pick([b"s0", None, src.chunk(8)])
        records.append(
            ConsumerRecord("obs", 0, -1, offset, 0, 0, key, value, _headers(src, arrow), None, -1, -1, -1)
        )
        offset += 1 + src.int(3)
    return f, records


def _summary(decoded: Any) -> tuple[list[tuple], list[tuple]]:
    events = sorted(decoded.events.select("offset", "seq", "series", "ts", "value").rows(), key=repr)
    rejected = sorted(((r.record.offset, r.reason, r.rows, r.value) for r in decoded.rejected), key=repr)
    return events, rejected


def check(data: bytes) -> None:
    """Decode the case drawn from ``data`` and assert the decoder's contract (see the module docstring)."""
    f, records = build_case(data)
    decoder = Decoder(f, MIN_TS, MAX_TS)
    decoded = decoder.decode(records)
    # nothing undecodable: that reason is the last resort for a guard this module lacks
    bad = [r for r in decoded.rejected if r.reason == UNDECODABLE]
    assert not bad, f"undecodable: {bad[0].detail}"
    assert all(r.reason in REASONS for r in decoded.rejected)
    ev = decoded.events
    assert dict(ev.schema) == EVENT_SCHEMA, ev.schema
    assert all(isinstance(s, str) for s in ev["series"].to_list())  # valid UTF-8, or to_list raises
    if ev.height:
        assert ev["ts"].min() >= MIN_TS and ev["ts"].max() <= MAX_TS
        assert ev["value"].is_finite().all()
    by_offset = {r.offset: r for r in records}
    assert set(ev["offset"].to_list()) <= by_offset.keys()
    assert ev["seq"].n_unique() == ev.height, "two events with one seq"
    in_events = ev.group_by("offset").len()
    counts = dict(in_events.iter_rows())
    whole = [r.record.offset for r in decoded.rejected if r.value is None]
    assert len(whole) == len(set(whole)), "a record rejected twice"
    for r in records:
        seen = counts.get(r.offset, 0) + sum(x.record.offset == r.offset for x in decoded.rejected)
        assert seen >= 1 or _empty_arrow(r), f"record at offset {r.offset} neither windowed nor rejected"
        if r.offset in whole:
            assert counts.get(r.offset, 0) == 0, "a record both rejected whole and windowed"
        if not any(k.lower() == "content-type" and v == ARROW_CONTENT_TYPE.encode() for k, v in r.headers):
            assert seen == 1, f"JSON record at offset {r.offset} accounted {seen} times"
    assert decoded.json_messages + decoded.arrow_messages == len(records)
    WindowState(TumblingWindow(1000, 500)).add(ev, now=0.0)
    # a record's fate does not depend on its neighbours
    alone = [decoder.decode([r]) for r in records]
    one_by_one = (pl.concat([a.events for a in alone]), [x for a in alone for x in a.rejected])
    want = _summary(type(decoded)(*one_by_one))
    assert _summary(decoded) == want, "decoding the batch differs from decoding its records one by one"
    # every rejection can be sent
    dlq = DeadLetters(_Encoder(), "obs.dlq")
    for item in decoded.rejected:
        dlq.send(item)


def _empty_arrow(record: ConsumerRecord) -> bool:
    """An Arrow IPC stream that reads as a valid table of no rows: nothing to window or reject."""
    try:
        return pa.ipc.open_stream(record.value).read_all().num_rows == 0
    except Exception:  # noqa: BLE001 - unreadable: not empty
        return False


class _Encoder:
    """A producer stand-in: the argument checks of kafka-python's ``KafkaProducer.send`` (copied, it
    needs a broker to get that far), then its record encoder (what the broker would get)."""

    def send(self, topic: str, value: bytes | None, key: bytes | None, headers: list) -> None:
        assert value is not None or key is not None, "KafkaProducer.send: Need at least one: key or value"
        assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers), (
            "KafkaProducer.send: All headers items must be (str, bytes) tuples"
        )
        builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 64 << 20)
        assert builder.append(0, timestamp=0, key=key, value=value, headers=headers) is not None
        return None


def main(argv: list[str]) -> None:
    import atheris

    import pipeline.ingest.arrow_ipc
    import pipeline.ingest.decode
    import pipeline.ingest.dlq

    # coverage of the decoder's Python code (pyarrow's and polars' native code is not instrumented)
    for module in (pipeline.ingest.decode, pipeline.ingest.arrow_ipc, pipeline.ingest.dlq):
        classes = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
        for obj in [*vars(module).values(), *(m for c in classes for m in vars(c).values())]:
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                atheris.instrument_func(obj)
    prefix = next((a.split("=", 1)[1] for a in argv if a.startswith("-artifact_prefix=")), "./")

    def one(data: bytes) -> None:
        try:
            check(data)
        except BaseException:
            # libFuzzer writes crash-<sha1> too, but a process that then hangs on exit (a native
            # thread pool) is killed by the -timeout alarm before it does: keep the input first
            Path(f"{prefix}crash-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
            raise

    atheris.Setup(argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
