"""Decode and validate observations, one poll batch at a time.

The values of one poll (of one partition) become one Arrow table: JSON
messages are joined into newline-delimited JSON and parsed in one call by
pyarrow's strict JSON reader (a number where a string belongs is an error,
not a silent coercion); only a batch that fails to parse is diagnosed
message by message. A message with the header
``content-type: application/vnd.apache.arrow.stream`` carries a whole batch as
an Arrow IPC stream and is read directly.

Every row then goes through the same vectorised checks (missing fields,
unparseable timestamps, NaN/inf, timestamps outside the accepted range).
Nothing is dropped: each failure becomes a :class:`Rejected` for the
dead-letter topic.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.json as pj

from pipeline.config import FieldSettings
from pipeline.windows import ENGINE

ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
ROW_BITS = 24  # seq = offset << ROW_BITS | row within an Arrow message

# Reasons a message or row is rejected (the `rollcast-reason` header).
MALFORMED_JSON = "malformed_json"
BAD_ARROW = "bad_arrow"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_TIMESTAMP = "bad_timestamp"
NON_FINITE = "non_finite"
TS_OUT_OF_RANGE = "ts_out_of_range"
LATE = "late"
REASONS = (MALFORMED_JSON, BAD_ARROW, MISSING_FIELD, WRONG_TYPE, BAD_TIMESTAMP, NON_FINITE, TS_OUT_OF_RANGE, LATE)

EVENT_SCHEMA = {"series": pl.String, "ts": pl.Int64, "value": pl.Float64, "offset": pl.Int64, "seq": pl.Int64}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_headers, _value = attrgetter("headers"), attrgetter("value")  # C-level field access over a whole poll
# One poll's JSON (a few MB) is parsed on the calling thread: faster than splitting it over
# Arrow's pool, and in ingest the other core belongs to the thread polling Kafka.
_ONE_THREAD = pj.ReadOptions(use_threads=False)


class Record(Protocol):
    """What a decoder needs of a Kafka record (kafka-python's ``ConsumerRecord`` has it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class Rejected:
    """One message (or some rows of an Arrow message) bound for the dead-letter topic.

    ``value`` is None to send the original bytes; for rows of an Arrow message
    it is an Arrow IPC stream holding just the rejected rows.
    """

    record: Any
    reason: str
    detail: str
    value: bytes | None = None
    rows: int = 1


@dataclass
class Decoded:
    """Valid events (``series, ts, value, offset, seq``, in offset order) and the rejects."""

    events: pl.DataFrame
    rejected: list[Rejected] = field(default_factory=list)
    json_messages: int = 0
    arrow_messages: int = 0


def is_arrow(record: Any) -> bool:
    """True when a record's headers mark it as an Arrow IPC stream."""
    for k, v in record.headers or ():
        if k.lower() == "content-type" and v == ARROW_CONTENT_TYPE.encode():
            return True
    return False


def parse_iso_ms(ts: pl.Expr) -> pl.Expr:
    """ISO-8601 strings (``Z`` or offset, or naive = UTC; date only allowed) to epoch ms; null if unparseable."""
    text = ts.str.replace(r"Z$", "+00:00")
    return pl.coalesce(
        text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", time_unit="ms", time_zone="UTC", strict=False),
        text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="ms", strict=False).dt.replace_time_zone("UTC"),
        text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="ms", strict=False).dt.replace_time_zone("UTC"),
        text.str.to_datetime("%Y-%m-%d", time_unit="ms", strict=False).dt.replace_time_zone("UTC"),
    ).dt.epoch("ms")


class Decoder:
    """Turns the records of one partition's poll into events and rejects."""

    def __init__(self, fields: FieldSettings, min_ts_ms: int, max_ts_ms: int):
        self.fields = fields
        self.min_ts_ms = min_ts_ms
        self.max_ts_ms = max_ts_ms
        names = (fields.series, fields.ts, fields.value)
        self._parse_int = pj.ParseOptions(
            explicit_schema=pa.schema([(names[0], pa.string()), (names[1], pa.int64()), (names[2], pa.float64())]),
            unexpected_field_behavior="ignore",
        )
        self._parse_str = pj.ParseOptions(
            explicit_schema=pa.schema([(names[0], pa.string()), (names[1], pa.string()), (names[2], pa.float64())]),
            unexpected_field_behavior="ignore",
        )

    def decode(self, records: Sequence[Any]) -> Decoded:
        """Decode the records of one partition (in offset order)."""
        if not records:
            return Decoded(pl.DataFrame(schema=EVENT_SCHEMA))
        if not any(map(_headers, records)):  # the usual JSON poll: no record has headers
            return self._decode_json(records)
        arrow_idx = [i for i, r in enumerate(records) if r.headers and is_arrow(r)]
        if not arrow_idx:
            return self._decode_json(records)
        parts: list[Decoded] = []
        json_run: list[Any] = []
        arrow_set = set(arrow_idx)
        for i, r in enumerate(records):
            if i in arrow_set:
                if json_run:
                    parts.append(self._decode_json(json_run))
                    json_run = []
                parts.append(self._decode_arrow(r))
            else:
                json_run.append(r)
        if json_run:
            parts.append(self._decode_json(json_run))
        return Decoded(
            pl.concat([p.events for p in parts]),
            [x for p in parts for x in p.rejected],
            sum(p.json_messages for p in parts),
            sum(p.arrow_messages for p in parts),
        )

    # -- JSON -------------------------------------------------------------------------------

    def _decode_json(self, records: Sequence[Any]) -> Decoded:
        values = list(map(_value, records))
        n = len(values)
        offsets = _offsets(records)
        table = None
        if None not in values:
            joined = b"\n".join(values)
            if joined.count(b"\n") == n - 1:  # no message holds a newline of its own
                table = self._read_json(joined, n)
        if table is None:
            return self._diagnose_json(records, offsets)
        f = self.fields
        ts = table.column(f.ts)
        frame = pl.from_arrow(
            pa.table(
                {
                    "series": table.column(f.series),
                    "ts_int": ts if pa.types.is_integer(ts.type) else pa.nulls(n, pa.int64()),
                    "ts_str": ts if pa.types.is_string(ts.type) else pa.nulls(n, pa.string()),
                    "value": table.column(f.value),
                }
            )
        )
        frame = frame.lazy().with_columns(offset=offsets, seq=offsets * (1 << ROW_BITS), idx=pl.int_range(n, dtype=pl.Int64))
        events, bad = self._check(frame)
        rejected = [Rejected(records[i], reason, detail) for i, reason, detail in bad.iter_rows()]
        return Decoded(events, rejected, json_messages=n)

    def _read_json(self, joined: bytes, n: int) -> pa.Table | None:
        for options in (self._parse_int, self._parse_str):
            try:
                table = pj.read_json(io.BytesIO(joined), read_options=_ONE_THREAD, parse_options=options)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            return table if table.num_rows == n else None
        return None

    def _diagnose_json(self, records: Sequence[Any], offsets: pl.Series) -> Decoded:
        """Slow path for a batch that failed to parse: classify each message."""
        f = self.fields
        rejected: list[Rejected] = []
        cols: dict[str, list[Any]] = {"series": [], "ts_int": [], "ts_str": [], "value": [], "idx": []}
        for i, r in enumerate(records):
            problem = _classify_json(r.value, f)
            if isinstance(problem, tuple):
                rejected.append(Rejected(r, *problem))
                continue
            s, t, v = problem[f.series], problem[f.ts], problem[f.value]
            cols["series"].append(s)
            cols["ts_int"].append(t if isinstance(t, int) else None)
            cols["ts_str"].append(t if isinstance(t, str) else None)
            cols["value"].append(float(v))
            cols["idx"].append(i)
        frame = pl.DataFrame(
            cols,
            schema={"series": pl.String, "ts_int": pl.Int64, "ts_str": pl.String, "value": pl.Float64, "idx": pl.Int64},
        )
        frame = frame.with_columns(offset=offsets.gather(frame["idx"]))
        frame = frame.with_columns(seq=pl.col("offset") * (1 << ROW_BITS))
        events, bad = self._check(frame)
        rejected.extend(Rejected(records[i], reason, detail) for i, reason, detail in bad.iter_rows())
        rejected.sort(key=lambda x: x.record.offset)
        return Decoded(events, rejected, json_messages=len(records))

    # -- Arrow IPC --------------------------------------------------------------------------

    def _decode_arrow(self, record: Any) -> Decoded:
        f = self.fields
        empty = pl.DataFrame(schema=EVENT_SCHEMA)
        try:
            table = pa.ipc.open_stream(record.value).read_all()
        except (pa.ArrowInvalid, OSError, TypeError) as e:
            return Decoded(empty, [Rejected(record, BAD_ARROW, f"not an Arrow IPC stream: {e}")], arrow_messages=1)
        missing = [c for c in (f.series, f.ts, f.value) if c not in table.column_names]
        if missing:
            detail = f"Arrow batch lacks column(s) {missing}; it has {table.column_names}"
            return Decoded(empty, [Rejected(record, MISSING_FIELD, detail, rows=table.num_rows)], arrow_messages=1)
        try:
            frame = self._arrow_columns(table)
        except TypeError as e:
            return Decoded(empty, [Rejected(record, WRONG_TYPE, str(e), rows=table.num_rows)], arrow_messages=1)
        n = table.num_rows
        seq0 = record.offset << ROW_BITS
        frame = frame.with_columns(
            idx=pl.int_range(n, dtype=pl.Int64),
            offset=pl.lit(record.offset, dtype=pl.Int64),
            seq=pl.int_range(n, dtype=pl.Int64) + seq0,
        )
        events, bad = self._check(frame)
        rejected = []
        for (reason,), rows in bad.group_by("reason", maintain_order=True):
            sub = table.take(pa.array(rows["idx"].to_numpy()))
            detail = f"{sub.num_rows} row(s) of an Arrow batch: {rows['detail'][0]}"
            rejected.append(Rejected(record, reason, detail, value=_ipc_bytes(sub), rows=sub.num_rows))
        return Decoded(events, rejected, arrow_messages=1)

    def _arrow_columns(self, table: pa.Table) -> pl.DataFrame:
        f = self.fields
        s, t, v = (table.column(c) for c in (f.series, f.ts, f.value))
        if pa.types.is_dictionary(s.type):
            s = s.cast(s.type.value_type)
        if not (pa.types.is_string(s.type) or pa.types.is_large_string(s.type)):
            raise TypeError(f"column {f.series} must be a string, got {s.type}")
        if pa.types.is_timestamp(t.type):
            t = t.cast(pa.timestamp("ms", tz=t.type.tz)).cast(pa.int64())
        if not (pa.types.is_integer(t.type) or pa.types.is_string(t.type) or pa.types.is_large_string(t.type)):
            raise TypeError(f"column {f.ts} must be epoch ms (integer), a timestamp or ISO-8601 text, got {t.type}")
        if not (pa.types.is_floating(v.type) or pa.types.is_integer(v.type)):
            raise TypeError(f"column {f.value} must be numeric, got {v.type}")
        n = table.num_rows
        is_int = pa.types.is_integer(t.type)
        return pl.from_arrow(
            pa.table(
                {
                    "series": s.cast(pa.string()),
                    "ts_int": t.cast(pa.int64()) if is_int else pa.nulls(n, pa.int64()),
                    "ts_str": t.cast(pa.string()) if not is_int else pa.nulls(n, pa.string()),
                    "value": v.cast(pa.float64()),
                }
            )
        )

    # -- shared checks ----------------------------------------------------------------------

    def _check(self, frame: pl.DataFrame | pl.LazyFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Split ``series, ts_int, ts_str, value, offset, seq, idx`` into events and ``idx, reason, detail``.

        One polars query when every row is valid (the usual case), a second one otherwise.
        """
        ts = pl.coalesce(pl.col("ts_int"), parse_iso_ms(pl.col("ts_str")))
        f = self.fields
        reason = (
            pl.when(pl.col("series").is_null() | pl.col("value").is_null())
            .then(pl.lit(MISSING_FIELD))
            .when(pl.col("ts_int").is_null() & pl.col("ts_str").is_null())
            .then(pl.lit(MISSING_FIELD))
            .when(pl.col("ts").is_null())
            .then(pl.lit(BAD_TIMESTAMP))
            .when(~pl.col("value").is_finite())
            .then(pl.lit(NON_FINITE))
            .when((pl.col("ts") < self.min_ts_ms) | (pl.col("ts") > self.max_ts_ms))
            .then(pl.lit(TS_OUT_OF_RANGE))
        )
        frame = frame.lazy().with_columns(ts=ts).with_columns(reason=reason).collect(engine=ENGINE)
        if frame.get_column("reason").null_count() == frame.height:
            events = frame[["series", "ts", "value", "offset", "seq"]]
            return events, pl.DataFrame(schema={"idx": pl.Int64, "reason": pl.String, "detail": pl.String})
        ok = frame.filter(pl.col("reason").is_null())
        events = ok.select("series", "ts", "value", "offset", "seq")
        detail = (
            pl.when(pl.col("reason") == MISSING_FIELD)
            .then(pl.lit(f"needs {f.series!r} (string), {f.ts!r} and {f.value!r} (number)"))
            .when(pl.col("reason") == BAD_TIMESTAMP)
            .then(pl.format("{}={} is neither epoch ms nor ISO-8601", pl.lit(f.ts), pl.col("ts_str")))
            .when(pl.col("reason") == NON_FINITE)
            .then(pl.format("{}={}", pl.lit(f.value), pl.col("value").cast(pl.String)))
            .otherwise(
                pl.format(
                    "{}={} outside [{}, {}]", pl.lit(f.ts), pl.col("ts").cast(pl.String),
                    pl.lit(self.min_ts_ms), pl.lit(self.max_ts_ms),
                )
            )
        )
        bad = frame.filter(pl.col("reason").is_not_null()).select("idx", "reason", detail.alias("detail"))
        return events, bad


def _offsets(records: Sequence[Any]) -> pl.Series:
    first, last, n = records[0].offset, records[-1].offset, len(records)
    if last - first + 1 == n:
        return pl.int_range(first, last + 1, dtype=pl.Int64, eager=True).alias("offset")
    return pl.Series("offset", [r.offset for r in records], dtype=pl.Int64)


def _classify_json(value: bytes | None, f: FieldSettings) -> dict[str, Any] | tuple[str, str]:
    """The parsed object if its fields have the right types, else ``(reason, detail)``."""
    if value is None:
        return MALFORMED_JSON, "empty message (no value)"
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        return MALFORMED_JSON, f"not JSON: {e}"
    if not isinstance(obj, dict):
        return MALFORMED_JSON, f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in (f.series, f.ts, f.value) if obj.get(k) is None]
    if missing:
        return MISSING_FIELD, f"missing or null field(s) {missing}"
    s, t, v = obj[f.series], obj[f.ts], obj[f.value]
    if not isinstance(s, str):
        return WRONG_TYPE, f"{f.series} must be a string, got {type(s).__name__}"
    if isinstance(t, bool) or not isinstance(t, int | str):
        return WRONG_TYPE, f"{f.ts} must be epoch ms (integer) or ISO-8601 text, got {type(t).__name__}"
    if isinstance(t, int) and not _INT64_MIN <= t <= _INT64_MAX:
        return TS_OUT_OF_RANGE, f"{f.ts}={t} does not fit in 64 bits"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return WRONG_TYPE, f"{f.value} must be a number, got {type(v).__name__}"
    try:
        float(v)
    except OverflowError:
        return NON_FINITE, f"{f.value}={v} overflows a double"
    return obj


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
