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

No input may stop the job, so nothing a third-party decoder does escapes
:meth:`Decoder.decode`: strings are checked to be UTF-8 before polars sees
them (pyarrow's JSON and IPC readers do not check; polars panics later on
invalid UTF-8), Arrow IPC tables are fully validated before any compute, and
a batch that still raises anything (a pyo3 ``PanicException`` derives from
``BaseException``) is decoded again record by record, so only the record that
raises goes to the dead-letter topic, with reason ``undecodable``.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from pipeline.config import FieldSettings
from pipeline.ingest.arrow_ipc import decoded_bytes
from pipeline.kafka.headers import ARROW_CONTENT_TYPE
from pipeline.windows import ENGINE

ROW_BITS = 24  # seq = offset << ROW_BITS | row within an Arrow message
# Most an Arrow IPC message may decode to (decompressed buffers, and text columns once a dictionary is
# expanded): a compressed or dictionary-encoded message of a few KB can otherwise hold gigabytes.
MAX_ARROW_BYTES = 256 << 20

# Reasons a message or row is rejected (the `rollcast-reason` header).
MALFORMED_JSON = "malformed_json"
BAD_ARROW = "bad_arrow"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_TIMESTAMP = "bad_timestamp"
NON_FINITE = "non_finite"
TS_OUT_OF_RANGE = "ts_out_of_range"
LATE = "late"
UNDECODABLE = "undecodable"  # a decoder raised (or panicked) on this record: a bug to report, not bad input
REASONS = (
    MALFORMED_JSON, BAD_ARROW, MISSING_FIELD, WRONG_TYPE, BAD_TIMESTAMP, NON_FINITE, TS_OUT_OF_RANGE, LATE,
    UNDECODABLE,
)
# Exceptions that are about the process, not the record: never turned into a rejection.
_NOT_INPUT = (KeyboardInterrupt, SystemExit, GeneratorExit)

log = logging.getLogger(__name__)

EVENT_SCHEMA = {"series": pl.String, "ts": pl.Int64, "value": pl.Float64, "offset": pl.Int64, "seq": pl.Int64}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NOT_AN_OBJECT = re.compile(rb"\n(?!\{)")  # a message after the first that does not start with "{" (or is empty)
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
        """Decode the records of one partition (in offset order); raises nothing for any input.

        If the batch raises (a bug or a panic in a decoder this module should have guarded), it is
        decoded again one record at a time and each record that still raises is rejected as
        ``undecodable`` with the exception's text; its neighbours are decoded as usual.
        """
        try:
            return self._decode(records)
        except _NOT_INPUT:
            raise
        except BaseException as e:  # noqa: BLE001 - includes pyo3's PanicException (a BaseException)
            if len(records) == 1:
                log.warning("undecodable record at offset %d: %s", records[0].offset, _describe(e), exc_info=e)
                return _undecodable(records[0], e)
            log.warning("a batch of %d records raised %s; decoding its records one by one", len(records), _describe(e))
            return _concat([self.decode([r]) for r in records])

    def _decode(self, records: Sequence[Any]) -> Decoded:
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
        return _concat(parts)

    # -- JSON -------------------------------------------------------------------------------

    def _decode_json(self, records: Sequence[Any]) -> Decoded:
        values = list(map(_value, records))
        n = len(values)
        offsets = _offsets(records)
        table = None
        if None not in values:
            joined = b"\n".join(values)
            # One row per message, in order, only if no message holds a newline and every one starts
            # with "{" (so none is blank: pyarrow skips a blank line, and a blank message beside one
            # holding two objects, ``{…}{…}``, gave the right row count with rows given to the wrong
            # records); and all must be UTF-8, which pyarrow does not check.
            if (
                joined.count(b"\n") == n - 1
                and joined.startswith(b"{")
                and _NOT_AN_OBJECT.search(joined) is None
                and _is_utf8(joined)
            ):
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
            if problem is _TOO_DEEP:
                problem = self._classify_deep(r.value)
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

    def _classify_deep(self, value: bytes) -> dict[str, Any] | tuple[str, str]:
        """A message nested deeper than Python's JSON parser goes: the fast path's reader decides, so
        a message's fate does not depend on its neighbours (pyarrow skips a deep unknown field)."""
        table = self._read_json(value, 1)
        if table is None:
            return MALFORMED_JSON, "not JSON, or nested too deeply to check (Python's parser gave up)"
        return _classify_json(json.dumps(table.to_pylist()[0]).encode(), self.fields)

    # -- Arrow IPC --------------------------------------------------------------------------

    def _decode_arrow(self, record: Any) -> Decoded:
        f = self.fields
        empty = pl.DataFrame(schema=EVENT_SCHEMA)
        try:
            size = decoded_bytes(record.value)  # from the metadata: nothing is decompressed yet
            if size > MAX_ARROW_BYTES:
                detail = f"the Arrow IPC stream decodes to {size} bytes, over the limit of {MAX_ARROW_BYTES}"
                return Decoded(empty, [Rejected(record, BAD_ARROW, detail)], arrow_messages=1)
            table = pa.ipc.open_stream(record.value).read_all()
            # the reader checks only the buffers' bounds: full validation (UTF-8, offsets, dictionary
            # indices) before any compute touches the data, since polars panics on invalid UTF-8
            table.validate(full=True)
        except Exception as e:  # noqa: BLE001 - anything pyarrow raises about the bytes is bad input
            detail = f"not a valid Arrow IPC stream: {type(e).__name__}: {e}"
            return Decoded(empty, [Rejected(record, BAD_ARROW, detail)], arrow_messages=1)
        names = table.column_names
        missing = [c for c in (f.series, f.ts, f.value) if c not in names]
        if missing:
            detail = f"Arrow batch lacks column(s) {missing}; it has {names[:20]}"
            return Decoded(empty, [Rejected(record, MISSING_FIELD, detail, rows=table.num_rows)], arrow_messages=1)
        twice = [c for c in (f.series, f.ts, f.value) if names.count(c) > 1]
        if twice:
            detail = f"Arrow batch has column(s) {twice} more than once"
            return Decoded(empty, [Rejected(record, BAD_ARROW, detail, rows=table.num_rows)], arrow_messages=1)
        try:
            frame = self._arrow_columns(table)
        except (TypeError, pa.ArrowException) as e:  # a type we do not take, or a cast that would overflow
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
            sub = _take(table, rows["idx"].to_list())
            detail = f"{sub.num_rows} row(s) of an Arrow batch: {rows['detail'][0]}"
            rejected.append(Rejected(record, reason, detail, value=_ipc_bytes(sub), rows=sub.num_rows))
        return Decoded(events, rejected, arrow_messages=1)

    def _arrow_columns(self, table: pa.Table) -> pl.DataFrame:
        f = self.fields
        s, t, v = (table.column(c) for c in (f.series, f.ts, f.value))
        for name, c in ((f.series, s), (f.ts, t)):
            if pa.types.is_dictionary(c.type) and _is_text(c.type.value_type):
                size = sum(pc.sum(pc.binary_length(k.dictionary).take(k.indices)).as_py() or 0 for k in c.chunks)
                if size > MAX_ARROW_BYTES:  # a few index bytes per row can repeat a long entry
                    raise TypeError(f"column {name} decodes to {size} bytes of text, over the limit of {MAX_ARROW_BYTES}")
        s, t, v = (c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in (s, t, v))
        if not _is_text(s.type):
            raise TypeError(f"column {f.series} must be a string, got {s.type}")
        if pa.types.is_timestamp(t.type):
            t = t.cast(pa.timestamp("ms", tz=t.type.tz)).cast(pa.int64())
        if not (pa.types.is_integer(t.type) or _is_text(t.type)):
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


def _is_utf8(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 (ASCII, the usual case, is checked without decoding)."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _describe(e: BaseException) -> str:
    return f"{type(e).__module__}.{type(e).__qualname__}: {e}"


def _undecodable(record: Any, e: BaseException) -> Decoded:
    arrow = bool(record.headers) and is_arrow(record)
    return Decoded(
        pl.DataFrame(schema=EVENT_SCHEMA), [Rejected(record, UNDECODABLE, _describe(e))],
        json_messages=int(not arrow), arrow_messages=int(arrow),
    )


def _concat(parts: Sequence[Decoded]) -> Decoded:
    return Decoded(
        pl.concat([p.events for p in parts]),
        [x for p in parts for x in p.rejected],
        sum(p.json_messages for p in parts),
        sum(p.arrow_messages for p in parts),
    )


def _offsets(records: Sequence[Any]) -> pl.Series:
    first, last, n = records[0].offset, records[-1].offset, len(records)
    if last - first + 1 == n:
        return pl.int_range(first, last + 1, dtype=pl.Int64, eager=True).alias("offset")
    return pl.Series("offset", [r.offset for r in records], dtype=pl.Int64)


_TOO_DEEP = ("too deep", "")  # sentinel: json.loads hit its recursion limit


def _classify_json(value: bytes | None, f: FieldSettings) -> dict[str, Any] | tuple[str, str]:
    """The parsed object if its fields have the right types, else ``(reason, detail)``
    (or :data:`_TOO_DEEP`)."""
    if value is None:
        return MALFORMED_JSON, "empty message (no value)"
    try:
        # strict UTF-8 (json.loads(bytes) would also take UTF-16 and UTF-32), a leading BOM
        # allowed as pyarrow allows it
        text = value.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return MALFORMED_JSON, f"not UTF-8: {e}"
    try:
        obj = json.loads(text)
    except RecursionError:
        return _TOO_DEEP
    except ValueError as e:
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
    for name, text in ((f.series, s), (f.ts, t)):
        if isinstance(text, str) and not _encodes(text):  # a lone surrogate escape such as "\\ud800"
            return MALFORMED_JSON, f"{name} holds an escape that is not a Unicode character (a lone surrogate)"
    try:
        float(v)
    except OverflowError:
        return NON_FINITE, f"{f.value}={v} overflows a double"
    return obj


def _take(table: pa.Table, idx: list[int]) -> pa.Table:
    """The rows ``idx`` of ``table``, whatever its column types."""
    try:
        return table.take(pa.array(idx, pa.int64()))
    except pa.ArrowNotImplementedError:  # a column type with no take kernel (string_view in pyarrow 25)
        return pa.concat_tables([table.slice(i, 1) for i in idx])


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
